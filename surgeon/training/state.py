"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds::

    trainable.safetensors   the trainable parameters, by name
    optimizer.safetensors   the optimizer's per-parameter state tensors (``state.<i>.<key>``)
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, param groups, scheduler state, Python/NumPy RNG, run fingerprint,
                            world size and whether the model was sharded

so that ``--resume`` continues exactly where the run stopped and no file is ever unpickled. A
sharded (FSDP) run writes one ``trainable``, ``optimizer`` and ``rng`` file per rank instead
(``trainable-rank00001.safetensors`` …), each with that rank's rows only; it resumes on the same
number of processes.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgeon.errors import CheckpointError, ConfigError
from surgeon.io.output import MADE_MARK, check_apart, check_name, made_by_surgeon, mark_made, output_folder, sibling
from surgeon.io.safetensors import write_file
from surgeon.dtensor import local

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Progress:
    """Where a run is: optimiser steps done, the fingerprint of the settings that shape it, and
    the identity of the inputs it trains from (``{"model": Checkpoint.identity(), …}``)."""

    step: int
    fingerprint: str
    inputs: dict[str, str] = field(default_factory=dict)


def _suffix(engine: Any) -> str:
    return f"-rank{engine.rank:05d}" if engine is not None and engine.sharded else ""


def save_checkpoint(
    folder: Path,
    progress: Progress,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    engine: Any = None,
) -> Path:
    """Write one checkpoint folder atomically (it appears complete or not at all). Called on every
    rank: a replicated run's main process writes everything; a sharded run's ranks each write
    their own rows into one shared temporary folder that the main process renames into place."""
    sharded = engine is not None and engine.sharded
    main = engine is None or engine.is_main
    if not sharded:
        if main:
            with output_folder(folder, overwrite=True) as tmp:
                _write_tensors(tmp, "", trainable, optimizer)
                _write_state(tmp, progress, optimizer, scheduler, engine)
        return Path(folder)
    tmp = sibling(folder, "tmp-shared")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    _write_tensors(tmp, _suffix(engine), trainable, optimizer)
    engine.barrier()
    if main:
        _write_state(tmp, progress, optimizer, scheduler, engine)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    engine.barrier()
    return Path(folder)


def _write_tensors(tmp: Path, suffix: str, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    write_file(tmp / f"trainable{suffix}.safetensors", {k: local(v).detach().contiguous().cpu() for k, v in trainable.items()})
    tensors = {}
    for idx, entries in optimizer.state_dict()["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = local(value).detach().contiguous().cpu()
    write_file(tmp / f"optimizer{suffix}.safetensors", tensors)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    write_file(tmp / f"rng{suffix}.safetensors", rng)


def _write_state(
    tmp: Path, progress: Progress, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, engine: Any
) -> None:
    opt = optimizer.state_dict()
    scalars = {
        f"state.{idx}.{key}": value for idx, entries in opt["state"].items() for key, value in entries.items() if not torch.is_tensor(value)
    }
    np_state = np.random.get_state()
    state = {
        "step": progress.step,
        "fingerprint": progress.fingerprint,
        "inputs": progress.inputs,
        "world_size": engine.world if engine is not None else 1,
        "sharded": bool(engine is not None and engine.sharded),
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (tmp / STATE_FILE).write_text(json.dumps(state))


ROOT_KIND = "checkpoints"
_ROOT_FILES = ("metrics.jsonl", "logs")  # what a run writes into its checkpoint folder besides checkpoints


def checkpoint_root(output: str | Path) -> Path:
    """Where intermediate checkpoints (and the metrics while a run lasts) of a run writing ``output`` live."""
    out = Path(output)
    return out.parent / f"{out.name}-checkpoints"


def check_root(output: str | Path, inputs: list[Any], resume: bool, overwrite: bool) -> bool:
    """Check the checkpoint folder of a run writing ``output`` before anything is written; True
    when an existing one must be removed before the run starts (``shutil.rmtree``, by the main
    process, holding the output's claim). Refuses (ConfigError) a folder that is, holds or lies
    inside an input, and a name too long for the file system. Without ``resume`` an existing
    folder may go only when surgeon made it (its mark) and it holds no checkpoint, or with
    ``overwrite``; anything else stops the run."""
    root = checkpoint_root(output)
    check_name(output, extra="-checkpoints")
    check_apart(root, inputs)
    if not root.exists() and not root.is_symlink():
        return False
    if root.is_symlink() or not root.is_dir():
        raise ConfigError("output", f"{root} exists and is not a folder", "move it away, or choose another output")
    ours = made_by_surgeon(root, ROOT_KIND) or latest_intact(root)[0] is not None  # (older versions left no mark)
    if resume:
        return False
    if any(root.glob("checkpoint-*")) and not overwrite:
        raise ConfigError("output", f"{root} holds checkpoints of an earlier run", "pass --resume to continue it, or --overwrite to start over")
    if not ours and not overwrite:
        raise ConfigError(
            "output", f"{root} exists and was not made by surgeon train (a run keeps its checkpoints there)",
            "move it away, choose another output, or pass --overwrite to replace it",
        )  # fmt: skip
    return True


def make_root(root: Path) -> None:
    """Create the checkpoint folder (if missing) with surgeon's mark."""
    root.mkdir(parents=True, exist_ok=True)
    if not made_by_surgeon(root, ROOT_KIND):
        mark_made(root, ROOT_KIND)


def remove_root(root: Path) -> bool:
    """At the end of a run: remove the checkpoint folder when surgeon made it and it holds no
    checkpoint (its metrics are in the output by then). Only what a run writes there is removed;
    a folder holding anything else is left. Returns whether it is gone."""
    if not made_by_surgeon(root, ROOT_KIND) or any(root.glob("checkpoint-*")):
        return False
    for name in _ROOT_FILES:
        entry = root / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    if {p.name for p in root.iterdir()} <= {MADE_MARK}:
        shutil.rmtree(root)
        return True
    return False


def remove_stale(root: Path) -> None:
    """Remove the temporary checkpoint folders a killed run left under ``root`` (call it while
    holding the run's output claim, so that no live run is writing them)."""
    import logging

    for stale in sorted(Path(root).glob(".checkpoint-*.surgeon-*")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            logging.getLogger("surgeon.training").warning(f"removed {stale.name}, left in {root} by an interrupted run")


_STATE_FIELDS = {
    "step": int, "fingerprint": str, "param_groups": list, "optimizer_scalars": dict, "scheduler": dict,
    "python_rng": list, "numpy_rng": list,
}  # fmt: skip


def _check_inputs(folder: Path, saved: dict, now: dict[str, str], anyway: bool, warn: Any) -> None:
    """ConfigError (or, ``anyway``, a warning) when an input a checkpoint was trained from changed."""
    changed = [name for name in now if name in saved and saved[name] != now[name]]
    if not changed:
        return
    what = " and ".join(changed)
    if not anyway:
        raise ConfigError(
            "resume", f"the {what} changed since {folder} was written (its weights differ)",
            f"resume with the same {what}, or pass --resume-anyway to continue on the changed one",
        )  # fmt: skip
    if warn is not None:
        warn(f"the {what} changed since {folder.name} was written; continuing on it as --resume-anyway asks")


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (``"rng.safetensors: is truncated …"``), or None when
    it is intact: state.json readable with every field, and every tensor file it needs (each
    rank's for a sharded one) present with a valid header."""
    from surgeon.io.header import FormatError, read_header

    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"{STATE_FILE}: missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{STATE_FILE}: not valid JSON ({' '.join(str(e).split())[:80]})"
    if not isinstance(state, dict):
        return f"{STATE_FILE}: not a JSON object"
    for key, kind in _STATE_FIELDS.items():
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state.get(key), bool)):
            return f"{STATE_FILE}: field {key!r} is missing or not a {kind.__name__}"
    ranks = state.get("world_size", 1) if state.get("sharded") else None
    suffixes = [f"-rank{r:05d}" for r in range(int(ranks))] if ranks else [""]
    for stem in ("trainable", "optimizer", "rng"):
        for suffix in suffixes:
            name = f"{stem}{suffix}.safetensors"
            if not (folder / name).is_file():
                return f"{name}: missing"
            try:
                read_header(folder / name)
            except FormatError as e:
                return f"{name}: {e}"
            except OSError as e:
                return f"{name}: {e.strerror or e}"
    return None


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest ``checkpoint-N`` folders under ``root`` (surgeon's own
    checkpoint folder only); returns what was removed."""
    if keep <= 0 or not made_by_surgeon(root, ROOT_KIND):
        return []
    found = sorted((int(p.name.split("-")[-1]), p) for p in Path(root).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit())
    removed = [path for _, path in found[: max(len(found) - keep, 0)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def chosen_checkpoint(resume: str, root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint ``--resume`` names: ``latest`` (the newest intact one under ``root``, and the
    damaged ones above it), a checkpoint folder's path, or a Hub repo ``org/name[@revision]`` holding
    one (downloaded into the Hugging Face cache); ConfigError/CheckpointError if it is not an intact
    checkpoint."""
    from surgeon.errors import CheckpointError, ConfigError

    from surgeon.hub.repo_ids import PINNED, is_repo_id

    if resume == "latest":
        return latest_intact(root)
    folder = Path(resume)
    if not folder.exists() and (is_repo_id(resume) or PINNED.match(resume)):
        from surgeon.hub.download import download_training_checkpoint

        folder = download_training_checkpoint(resume)  # a checkpoint pushed to the Hub: org/name[@revision]
    if not folder.is_dir():
        raise ConfigError(
            "resume", f"{resume} is not a checkpoint folder",
            f"give one of the checkpoint-N folders in {root}, a Hub repo id[@revision] holding one, or --resume alone for the latest",
        )  # fmt: skip
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(str(folder), f"is not an intact checkpoint: {problem}", "choose another checkpoint-N folder")
    return folder, []


def latest_intact(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The intact checkpoint with the highest step under ``root``, and the damaged ones above it
    (newest first) with what is wrong with each."""
    found = sorted(
        ((int(p.name.split("-")[-1]), p) for p in Path(root).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        reverse=True,
    )
    damaged = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def load_checkpoint(
    folder: Path,
    progress: Progress,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    engine: Any = None,
    anyway: bool = False,
    warn: Any = None,
) -> int:
    """Restore a checkpoint into live objects; returns the step to continue from.

    Refuses a checkpoint made with settings that change the run (model, data, batch, seed …:
    ``progress.fingerprint``), a sharded checkpoint on another number of processes or without
    sharding (and the reverse), and one whose inputs changed since it was written (the base
    model's weights, the prior: ``progress.inputs``) unless ``anyway`` (then ``warn`` is told).
    """
    from safetensors.torch import load_file

    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(
            str(folder), f"is damaged: {problem}", "resume from an earlier checkpoint (move this one away), or start over with --overwrite"
        )
    state = json.loads((folder / STATE_FILE).read_text())
    _check_inputs(folder, state.get("inputs") or {}, progress.inputs, anyway, warn)
    if state["fingerprint"] != progress.fingerprint:
        raise ConfigError(
            "resume",
            f"{folder} was made with different training settings",
            "resume with the same model, data and options, or start a new output folder",
        )
    sharded = bool(engine is not None and engine.sharded)
    world = engine.world if engine is not None else 1
    saved_world, saved_sharded = state.get("world_size", 1), state.get("sharded", False)
    if saved_sharded != sharded or (sharded and saved_world != world):
        how = f"--fsdp on {saved_world} processes" if saved_sharded else "without --fsdp"
        now = f"--fsdp on {world} processes" if sharded else "unsharded"
        raise ConfigError(
            "resume",
            f"{folder} holds the model sharded over {saved_world} processes, this run is {now}" if saved_sharded
            else f"{folder} holds an unsharded model, this run is {now}",
            f"resume {how} (e.g. torchrun --nproc-per-node {saved_world} … --fsdp --resume)" if saved_sharded else f"resume {how}",
        )
    suffix = _suffix(engine)
    weights = load_file(str(folder / f"trainable{suffix}.safetensors"))
    if set(weights) != set(trainable):
        raise ConfigError("resume", f"{folder} holds other trainable parameters than this run", "start a new output folder")
    with torch.no_grad():
        for name, param in trainable.items():
            local(param).copy_(weights[name])
    tensors = load_file(str(folder / f"optimizer{suffix}.safetensors"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        _, idx, name = key.split(".", 2)
        param = params[int(idx)]
        if torch.is_tensor(value) and hasattr(param, "placements") and tuple(value.shape) == tuple(local(param).shape):
            from torch.distributed.tensor import DTensor

            value = DTensor.from_local(value.to(local(param).device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(str(folder / f"rng{suffix}.safetensors"))
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
