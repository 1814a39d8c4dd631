"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds::

    trainable.safetensors   the trainable parameters, by name
    optimizer.safetensors   the optimizer's per-parameter state tensors (``state.<i>.<key>``)
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, param groups, scheduler state, Python/NumPy RNG, run fingerprint

so that ``--resume`` continues exactly where the run stopped and no file is ever unpickled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgeon.errors import ConfigError
from surgeon.output import output_folder
from surgeon.safetensors_io import write_file

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Progress:
    """Where a run is: optimiser steps done and the fingerprint of the settings that shape it."""

    step: int
    fingerprint: str


def save_checkpoint(
    folder: Path,
    progress: Progress,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    """Write one checkpoint folder atomically (it appears complete or not at all)."""
    with output_folder(folder, overwrite=True) as tmp:
        write_file(tmp / "trainable.safetensors", {k: v.detach().contiguous().cpu() for k, v in trainable.items()})
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, entries in opt["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars[f"state.{idx}.{key}"] = value
        write_file(tmp / "optimizer.safetensors", tensors)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        write_file(tmp / "rng.safetensors", rng)
        np_state = np.random.get_state()
        state = {
            "step": progress.step,
            "fingerprint": progress.fingerprint,
            "param_groups": opt["param_groups"],
            "optimizer_scalars": scalars,
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        (tmp / STATE_FILE).write_text(json.dumps(state))
    return Path(folder)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (``checkpoint-<step>``)."""
    found = []
    for p in Path(root).glob("checkpoint-*"):
        if (p / STATE_FILE).exists() and p.name.split("-")[-1].isdigit():
            found.append((int(p.name.split("-")[-1]), p))
    return max(found)[1] if found else None


def load_checkpoint(
    folder: Path,
    fingerprint: str,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Restore a checkpoint into live objects; returns the step to continue from.

    Refuses a checkpoint made with settings that change the run (model, data, batch, seed …).
    """
    from safetensors.torch import load_file

    state = json.loads((folder / STATE_FILE).read_text())
    if state["fingerprint"] != fingerprint:
        raise ConfigError(
            "resume",
            f"{folder} was made with different training settings",
            "resume with the same model, data and options, or start a new output folder",
        )
    weights = load_file(str(folder / "trainable.safetensors"))
    if set(weights) != set(trainable):
        raise ConfigError("resume", f"{folder} holds other trainable parameters than this run", "start a new output folder")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name])
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, values, gauss = state["python_rng"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return int(state["step"])
