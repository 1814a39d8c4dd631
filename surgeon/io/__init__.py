"""Local files: safetensors one tensor at a time, checkpoint folders, block streaming, outputs that
appear complete or not at all, and ``surgeon.json`` records. Nothing here talks to the Hub
(``surgeon.hub`` fetches what a repo id names, then opens it with these readers).

    header.py        the safetensors header, read and built without torch
    safetensors.py   tensors read and written one at a time
    checkpoint.py    a model folder (or a repo's fetched headers), read one tensor at a time
    paths.py         what a path is before it is opened (FIFOs and devices are not data)
    streaming.py     tensor arithmetic over whole checkpoints in bounded memory
    output.py        atomic output folders, claims, a streaming sharded writer
    provenance.py    ``surgeon.json``: how an output folder was made
"""
