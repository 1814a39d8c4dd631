"""Which KV heads Image-LoRA adapts: influence probes (``probes``), ``surgeon score-heads``
(``score``) and the head budget (``budget``).
"""
