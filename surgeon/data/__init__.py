"""Training data: sources read one row at a time (``rows``), the record formats (``formats``),
samples (``samples``), the validation pass over a source (``scan``), model inputs built with the
model's own processor (``encoding``) and datasets for a DataLoader (``loading``).

    from surgeon.data import scan_samples    # names of samples, formats and scan are available here
"""

from surgeon._compat import forward

__getattr__ = forward(__name__, "samples", "formats", "scan")
