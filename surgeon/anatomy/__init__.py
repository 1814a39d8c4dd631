"""Where things are in a model: the language model, vision tower and projector (``layout``), tensor
families and selections (``families``), mixture-of-experts layouts (``experts``), LLM<->VLM name
pairing (``align``), config sizes checked against limits and weights (``limits``), the ``surgeon
inspect`` report (``inspect``), and the decoder of a loaded ``torch.nn.Module`` (``decoder``).
"""
