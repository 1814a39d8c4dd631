"""Publishing an output folder: ``surgeon push`` (``push``), what it sends and refuses (``upload``,
``secrets``), and the model card built from ``surgeon.json`` (``card``, ``markdown``). The requests
themselves go through ``surgeon.hub.client``.
"""
