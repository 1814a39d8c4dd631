"""Hub repo ids, recognised without torch or ``huggingface_hub``: the one definition every module uses.

    REPO_ID.match("Qwen/Qwen2.5-VL-7B-Instruct")          # a model, dataset or space id
    PINNED.match("Qwen/Qwen2.5-VL-7B-Instruct@abc123")    # groups: id, revision
    DATASET.match("HuggingFaceM4/ChartQA:train")          # id[@revision][:split]
"""

from __future__ import annotations

import re

_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
REPO_ID = re.compile(rf"^{_ID}$")
PINNED = re.compile(rf"^({_ID})@([\w./-]+)$")  # org/name@revision
DATASET = re.compile(rf"^{_ID}(@[\w./-]+)?(:\w+)?$")  # org/name[@revision][:split]


def is_repo_id(text: str) -> bool:
    """``org/name`` that can name a Hub repo (no leading dot, no ``..``)."""
    return bool(REPO_ID.match(text)) and not text.startswith(".") and ".." not in text
