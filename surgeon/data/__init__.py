"""Training data: sources read one row at a time (``rows``), the record formats (``formats``),
samples (``samples``), the validation pass over a source (``scan``), chat templates under bounds
(``templates``), model inputs built with the model's own processor (``encoding``) and datasets for
a DataLoader (``loading``).
"""
