"""Which KV heads Image-LoRA adapts: influence probes (``probes``), ``surgeon score-heads``
(``score``) and the head budget (``budget``).

    from surgeon.heads import score_heads    # the names of ``surgeon.heads.score`` are available here
"""

from surgeon._compat import forward

__getattr__ = forward(__name__, "score")
