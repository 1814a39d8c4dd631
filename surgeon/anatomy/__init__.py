"""Where things are in a model: the language model, vision tower and projector (``layout``), tensor
families and selections (``families``), mixture-of-experts layouts (``experts``), LLM<->VLM name
pairing (``align``), the ``surgeon inspect`` report (``inspect``), and the same places in a loaded
``torch.nn.Module`` (``model``).
"""
