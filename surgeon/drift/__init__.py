"""DRIFT: the reasoning prior Δ (``prior``), the statistics of how far two models are apart
(``distance``), and the gradient bias that uses Δ during fine-tuning (``bias``).

    from surgeon.drift import Drift          # the names of ``surgeon.drift.bias`` are available here
"""

from surgeon._compat import forward

__getattr__ = forward(__name__, "bias")
