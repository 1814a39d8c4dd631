"""What surgeon injects into models: the remote-code modeling file every module folder carries
(``modeling_surgeon``), IADA blocks (``iada``), Image-LoRA adapters (``image_lora``), and loading and
saving folders that hold them (``folders``).

    from surgeon.modules import load_model   # the names of ``surgeon.modules.folders`` are available here
"""

from surgeon._compat import forward

__getattr__ = forward(__name__, "folders")
