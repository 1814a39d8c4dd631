"""Reading and writing: safetensors files one tensor at a time, checkpoints (local or Hub),
block streaming, outputs that appear complete or not at all, and ``surgeon.json`` records.

    safetensors.py   the file format (headers need no torch)
    checkpoint.py    a local folder or Hub repo id, read one tensor at a time
    streaming.py     tensor arithmetic over whole checkpoints in bounded memory
    output.py        atomic output folders, claims, a streaming sharded writer
    provenance.py    ``surgeon.json``: how an output folder was made
"""
