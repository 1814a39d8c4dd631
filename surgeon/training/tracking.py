"""Where a run's metrics go: ``metrics.jsonl`` (``MetricsLog``), and the experiment trackers of
``surgeon train --report-to``: Accelerate's TensorBoard and W&B trackers.

    tracker = open_tracker("tensorboard", "run", logs=Path("run-checkpoints/logs"), config=asdict(config))
    tracker.log({"loss": 1.2}, step=1)
    tracker.finish()

TensorBoard writes event files under ``logs/<run name>/`` (``surgeon train`` keeps them beside its
checkpoints while it runs and copies them into the output folder at the end); W&B follows its own
settings (``WANDB_MODE=offline`` writes a local run). Only numbers are logged.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from surgeon.errors import ConfigError

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(name: str) -> None:
    """ConfigError, before anything loads, when the tracker's package is missing."""
    package = _PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError("report_to", f"{name} is not installed", f"pip install {package}, or drop --report-to")


def open_tracker(name: str, run_name: str, logs: Path, config: dict[str, Any]) -> Any:
    """A started tracker (None for ``none``) with the run's settings stored."""
    if name == "none":
        return None
    check_tracker(name)
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        logs.mkdir(parents=True, exist_ok=True)
        tracker = TensorBoardTracker(run_name, logs)
    else:
        tracker = WandBTracker(run_name)
    tracker.start()
    tracker.store_init_configuration({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
    return tracker


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


_TRAINER_NAMES = {"lr": "learning_rate"}  # the Trainer's name where it logs the same number


def tracker_tags(metrics: dict[str, float]) -> dict[str, float]:
    """The tags a tracker shows, in the Trainer's namespaces so that runs line up in one board:
    ``train/<name>`` for the step's metrics (``train/learning_rate`` for ``lr``), ``eval/…`` as
    they are (``kl_base`` as ``eval/kl_base``); ``metrics.jsonl`` keeps the plain names."""
    out = {}
    for name, value in metrics.items():
        if name.startswith("eval/"):
            out[name] = value
        elif name == "kl_base":
            out["eval/kl_base"] = value
        else:
            out[f"train/{_TRAINER_NAMES.get(name, name)}"] = value
    return out


class MetricsLog:
    """``metrics.jsonl`` beside the checkpoints: one line per step, written as the step ends. A
    resumed run first drops the lines of steps after the checkpoint it continues from."""

    def __init__(self, path: Path, start: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if start and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= start]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self._file = open(path, "a")

    def write(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
