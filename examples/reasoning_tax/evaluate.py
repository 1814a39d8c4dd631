"""Held-out accuracy by greedy generation: text reasoning, perception, end to end, scored by
``surgeon eval``'s own function (``surgeon.evaluation.run.score_model``), so that anyone can take the
same measurement of their own models with ``surgeon eval``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ANSWER = re.compile(r"Answer:\s*(-?\d+)")  # the organism's answers; a completion without one is wrong


def load(folder: str | Path, device: str = "cpu") -> Any:
    """Any output of the study's commands: a plain, merged, IADA or Image-LoRA model folder."""
    from transformers.utils import logging as hf_logging

    import surgeon

    hf_logging.disable_progress_bar()
    return surgeon.load_model(str(folder)).to(device).eval()


def _rows(model: Any, processor: Any, path: Path) -> list[dict]:
    from surgeon.data.encoding import SampleEncoder
    from surgeon.evaluation.generate import read_items
    from surgeon.evaluation.run import score_model

    items, _ = read_items(f"{path.stem}={path}")
    return score_model(model, SampleEncoder(processor), items, batch_size=50, max_new_tokens=64, pattern=ANSWER)


def text_correct(model: Any, processor: Any, path: Path) -> list[bool]:
    """Per item of ``path``: the final answer is right."""
    return [bool(r["correct"]) for r in _rows(model, processor, path)]


def visual_correct(model: Any, processor: Any, path: Path) -> tuple[list[bool], list[bool]]:
    """Per item: (perception, end to end): the completion says the perception reference (the tile
    count and colour); the final answer is right."""
    rows = _rows(model, processor, path)
    return [bool(r.get("perception_correct")) for r in rows], [bool(r["correct"]) for r in rows]
