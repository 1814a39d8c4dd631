"""Training data: sources read one row at a time (``rows``), samples and their validation
(``samples``), and model inputs built with the model's own processor (``encoding``).

    from surgeon.data import scan_samples    # the names of ``surgeon.data.samples`` are available here
"""

from surgeon._compat import forward

__getattr__ = forward(__name__, "samples")
