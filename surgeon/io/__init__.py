"""Reading and writing: safetensors files one tensor at a time, checkpoints (local or Hub),
block streaming, outputs that appear complete or not at all, and ``surgeon.json`` records.

    safetensors.py   the file format (headers need no torch)
    checkpoint.py    a local folder or Hub repo id, read one tensor at a time
    download.py      fetching a checkpoint (never a pickle) from the Hub or its cache
    hub_errors.py    every Hub client error as one line that names the next step
    repo_ids.py      what a Hub repo id looks like (no torch)
    streaming.py     tensor arithmetic over whole checkpoints in bounded memory
    output.py        atomic output folders, claims, a streaming sharded writer
    provenance.py    ``surgeon.json``: how an output folder was made
"""
