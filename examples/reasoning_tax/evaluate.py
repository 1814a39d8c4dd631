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


def text_accuracy(model: Any, processor: Any, path: Path) -> float:
    rows = _rows(model, processor, path)
    return sum(1 for r in rows if r["correct"]) / len(rows)


def visual_accuracy(model: Any, processor: Any, path: Path) -> tuple[float, float]:
    """(perception, end to end): the completion says the perception reference (the tile count and
    colour); the final answer is right."""
    rows = _rows(model, processor, path)
    return sum(1 for r in rows if r.get("perception_correct")) / len(rows), sum(1 for r in rows if r["correct"]) / len(rows)
