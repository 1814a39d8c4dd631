"""After the loop: the trained model gathered (from shards) and written as the run's output folder,
with its processor, metrics and ``surgeon.json``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from surgeon.io.provenance import file_hash
from surgeon.modules.folders import module_parameters, write_adapter_modules, write_model, write_module_folder
from surgeon.training.build import Run, build_model
from surgeon.training.config import Precision, TrainConfig
from surgeon.training.lora import trainable


def output_model(run: Run, model: torch.nn.Module, config: TrainConfig, precision: Precision, engine: Any) -> torch.nn.Module | None:
    """The trained model as the main process saves it (None on the other processes).

    Replicated runs: the model itself. Sharded runs: the trained parameters are gathered one
    tensor at a time (each rank's rows, collected on the main process's CPU) into a copy of the
    model that the main process loads from the checkpoint (memory-mapped: untouched frozen weights
    cost no memory) and builds exactly as the run built its own; every rank takes part in each
    gather, and no process ever holds more than that one copy of the trained weights."""
    if not engine.sharded:
        return engine.accelerator.unwrap_model(model)
    gathered: dict[str, torch.Tensor] = {}
    for name, p in trainable(model).items():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if engine.is_main:
            gathered[name] = full.detach().to("cpu", copy=True)
        del full
    if not engine.is_main:
        return None
    twin = build_model(config, run.checkpoint.path, precision.frozen)
    missing = [name for name in gathered if name not in dict(twin.named_parameters())]
    if missing:
        raise RuntimeError(f"the rebuilt model lacks {len(missing)} trained parameters, e.g. {missing[0]}")
    for name, p in twin.named_parameters():
        if name in gathered:
            p.data = gathered.pop(name)
    return twin


def save_output(run: Run, model: torch.nn.Module, config: TrainConfig, stats: dict, metrics: Path) -> Path:
    """Write the final folder: a peft adapter, a merged model, or full weights; plus the
    processor, ``metrics.jsonl`` and ``surgeon.json``."""
    from surgeon.io.output import output_folder
    from surgeon.io.provenance import build_record, write_record

    with output_folder(config.output, overwrite=config.overwrite) as tmp:
        if config.full or config.merge_lora:
            final = model if config.full else model.merge_and_unload()
            write_model(final, tmp, run.processor)
            artifact = "model+remote-code" if module_parameters(final) else "model"
        elif config.image_lora:  # only surgeon modules (and maybe the vision tower) trained
            if config.train_vision:
                write_model(model, tmp, run.processor)
            else:
                write_module_folder(model, run.checkpoint, tmp)
            artifact = "model+remote-code"
        else:
            base = run.checkpoint  # a Hub id with its revision for peft, or the local folder's full path
            peft_config = model.peft_config["default"]
            peft_config.base_model_name_or_path = base.source if base.commit else str(base.path.resolve())
            peft_config.revision = base.revision if base.commit else None
            model.save_pretrained(tmp)
            write_adapter_modules(model, tmp)
            run.processor.save_pretrained(tmp)
            artifact = "peft-adapter"
        if metrics.exists():
            shutil.copy(metrics, tmp / "metrics.jsonl")
        if (metrics.parent / "logs").is_dir():  # tracker event files (--report-to tensorboard)
            shutil.copytree(metrics.parent / "logs", tmp / "logs")
        data = {"source": config.data, "sha256": run.data_fingerprint}
        inputs: dict[str, Any] = {"model": run.checkpoint, "data": data | (run.data_hub or {})}
        if config.prior:
            inputs["prior"] = {"source": config.prior}
        if config.image_lora:
            from surgeon.heads.score import heads_file

            inputs["heads"] = {"source": config.image_lora, "sha256": file_hash(heads_file(config.image_lora))}
        record = build_record("train", artifact, config, inputs, stats, methods=applied_methods(config, stats))
        write_record(tmp, record)
    return Path(config.output)


def applied_methods(config: TrainConfig, stats: dict) -> list[str]:
    """What a run applied, as recorded in ``surgeon.json`` (and shown as the card's tags): ``drift``
    (a prior with α > 0), ``iada`` (blocks in the trained model), ``image-lora`` or ``lora`` (also
    when merged), ``perception-reweighting`` (a perception weight, fixed or dynamic)."""
    modules = stats.get("surgeon_modules") or []
    methods = []
    if config.prior and config.drift_alpha > 0:
        methods.append("drift")
    if "iada" in modules:
        methods.append("iada")
    if config.image_lora:
        methods.append("image-lora")
    elif not config.full:
        methods.append("lora")
    if config.perception_weight is not None:
        methods.append("perception-reweighting")
    return methods
