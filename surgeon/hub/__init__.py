"""The one boundary to the Hugging Face Hub, through the real ``huggingface_hub`` client: what a
repo id looks like (``repo_ids``), every client error as one line (``errors``), fetching
checkpoints, configs and safetensors headers (``download``), opening a model by folder or repo id
(``sources``), and the requests of a push (``client``). Publishing itself, the upload plan and the
model card are ``surgeon.publish``.
"""
