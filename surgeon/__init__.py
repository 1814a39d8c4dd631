"""surgeon: model surgery for fine-tuning vision-language models.

The library behind the ``surgeon`` command: checkpoint streaming and layouts, DRIFT reasoning
priors and merge baselines, IADA depth aggregation, Image-LoRA, perception/reasoning reweighting,
a minimal trainer, and Hub publishing. Each command's work is one function here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load_model(path: str | Path, **kwargs: Any) -> Any:
    """Load a model folder with its surgeon modules (IADA, …) attached; no remote code needed.

    See ``surgeon.modules.load_model``; ``kwargs`` go to transformers' ``from_pretrained``.
    """
    from surgeon.modules import load_model as load

    return load(path, **kwargs)


def __getattr__(name: str) -> Any:
    """``DriftCallback``, ``PerceptionLoss``, ``PerceptionCollator`` (``surgeon.integrations``), imported
    on first use so that ``import surgeon`` stays light."""
    if name in ("DriftCallback", "PerceptionLoss", "PerceptionCollator"):
        from surgeon import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
