"""Publishing to the Hugging Face Hub: ``push`` through the ``huggingface_hub`` client (``client``), what
a push sends and refuses (``upload``), and the model card (``card``, ``markdown``).

    from surgeon.hub import push_folder      # the names of ``surgeon.hub.client`` are available here
"""

from surgeon._compat import forward

__getattr__ = forward(__name__, "client", "surgeon.io.download")
