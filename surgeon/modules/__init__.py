"""What surgeon injects into models: the remote-code modeling file every module folder carries
(``modeling_surgeon``), IADA blocks (``iada``), Image-LoRA adapters (``image_lora``), and loading and
saving folders that hold them (``folders``).
"""
