"""Before and after the loop: data, model and trainable parameters in; the output folder out."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import ConfigError
from surgeon.modules.iada import IadaConfig, add_iada
from surgeon.modules.folders import (
    load_model,
    module_parameters,
    write_adapter_modules,
    write_model,
    write_module_folder,
)
from surgeon.io.provenance import file_hash
from surgeon.training.config import Precision, TrainConfig
from surgeon.training.model import apply_lora, set_trainable, trainable


@dataclass
class Run:
    """Everything the loop needs, built from a TrainConfig."""

    model: torch.nn.Module
    dataset: Any  # surgeon.data.encoding.EncodedDataset
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    processor: Any
    checkpoint: Any  # surgeon.io.checkpoint.Checkpoint of the model
    trainable: dict[str, torch.nn.Parameter]
    data_fingerprint: str
    has_surgeon_modules: bool
    stats: dict[str, Any] = field(default_factory=dict)


def check_inputs(config: TrainConfig) -> Any:
    """Fail fast, before anything slow, on inputs that cannot work; returns the model checkpoint."""
    from surgeon.io.checkpoint import open_checkpoint
    from surgeon.errors import DataError

    from surgeon.data.rows import looks_like_hub_dataset

    if not Path(config.data).exists() and not looks_like_hub_dataset(config.data):  # type: ignore[arg-type]
        raise DataError(config.data, "no such file", "give a .jsonl or .parquet file, a save_to_disk folder, or a Hub dataset id")  # type: ignore[arg-type]
    if config.prior:
        from surgeon.drift.prior import open_prior

        open_prior(config.prior).close()
    ckpt = open_checkpoint(config.model)
    from surgeon.anatomy.limits import check_checkpoint

    check_checkpoint(ckpt)
    if config.image_lora:
        from surgeon.heads.score import read_heads
        from surgeon.anatomy.layout import config_value, text_config

        layers = config_value(text_config(ckpt.config), "num_hidden_layers")
        selected = read_heads(config.image_lora, "image_lora").selected
        if isinstance(layers, int) and len(selected) != layers:
            raise ConfigError(
                "image_lora",
                f"{config.image_lora} selects heads in {len(selected)} layers but {config.model} has {layers}",
                "score the heads of this model with surgeon score-heads",
            )
    return ckpt


def prepare(config: TrainConfig, ckpt: Any, precision: Precision, sharded: bool = False) -> Run:
    """Load and encode the data, load the model, choose and mark the trainable parameters.

    ``sharded``: the model is loaded in the checkpoint's own dtype (memory-mapped, so a process
    reads only the rows it keeps) and cast unit by unit when FSDP shards it; otherwise every
    parameter is cast to the precision policy here."""
    from surgeon.data.scan import scan_samples
    from surgeon.data.encoding import SampleEncoder
    from surgeon.data.loading import LazyDataset

    config.require_io()
    scanned = scan_samples(config.data, config.perception_regex, skip_bad=config.skip_bad_lines)  # type: ignore[arg-type]
    encoder = SampleEncoder.from_pretrained(ckpt.path, max_length=config.max_length, name=config.model)
    dataset = LazyDataset(scanned, encoder, skip_bad=config.skip_bad_lines)
    stats = scanned.stats
    stats.used = len(scanned)
    if config.perception_weight is not None and not scanned.perception:
        how = f"--perception-regex {config.perception_regex!r}" if config.perception_regex else "<perception>…</perception> tags"
        raise ConfigError(
            "perception_weight",
            f"no supervised token of {config.data} is marked as perception ({how}), so the weight would change nothing",
            "mark perception spans in the answers (or fix --perception-regex), or drop --perception-weight",
        )
    model = build_model(config, ckpt.path, "auto" if sharded else precision.frozen)
    if not sharded:
        cast_parameters(model.parameters(), precision)
    extra: dict[str, Any] = {}
    if config.image_lora:
        extra["image_lora"] = _image_lora_report(model, config, dataset)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    extra["surgeon_modules"] = [kind for kind in ("iada", "image_lora") if module_parameters(base, kind)]  # all train
    params = trainable(model)
    if not params:
        raise ConfigError("model", "no parameter would train", "check --full / LoRA targets")
    n_train = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in model.parameters())
    return Run(
        model=model,
        dataset=dataset,
        collate=encoder.collate,
        processor=encoder.processor,
        checkpoint=ckpt,
        trainable=params,
        data_fingerprint=scanned.rows.fingerprint(),
        has_surgeon_modules=bool(extra["surgeon_modules"]),
        stats={"data": dataset.stats.to_dict(), "trainable_parameters": n_train, "parameters": n_total, **extra},
    )


def build_model(config: TrainConfig, source: str | Path | dict, dtype: str) -> torch.nn.Module:
    """The model a run trains, without its data: loaded from ``source`` (a model folder) in
    ``dtype`` (a torch dtype name, or ``auto`` for the checkpoint's own), or, for a config.json
    dict, built empty on the meta device (memory plans); then IADA / Image-LoRA modules added,
    gradient checkpointing on, LoRA applied or the language model unfrozen, every other
    parameter frozen. The same options always give the same structure and parameter names."""
    if isinstance(source, dict):
        model = empty_model(source)
    else:
        model = load_model(source, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    if config.iada:
        if module_parameters(model, "iada"):
            raise ConfigError("iada", f"{config.model} already has IADA blocks, which train anyway", "drop --iada")
        add_iada(model, IadaConfig())
    if config.image_lora:
        _add_image_lora(model, config)
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; the old name warns
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if config.full:
        set_trainable(model, full=True, train_vision=config.train_vision)
        return model
    lora = not config.image_lora  # Image-LoRA trains alone: no LoRA on the language model, which stays frozen
    if lora:  # with --train-vision, peft trains and saves the vision tower and projector (modules_to_save)
        model = apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.lora_dropout, config.train_vision)
    set_trainable(model, full=False, train_vision=config.train_vision and not lora)
    return model


def empty_model(model_config: dict) -> torch.nn.Module:
    """A model of a config.json dict on the meta device: shapes, names and no memory."""
    from transformers import AutoConfig

    from surgeon.modules import modeling_surgeon as modeling

    try:
        config = AutoConfig.for_model(**model_config)
    except Exception as e:  # noqa: BLE001 - transformers' own validation of config.json, one line
        raise ConfigError("model", f"transformers refuses its config.json ({' '.join(str(e).split())[:240]})", "restore the config the model was saved with") from None
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ConfigError("model", "config.json names no architecture", "give a transformers model folder")
    try:
        cls = modeling.architecture_class(architectures[0])
    except modeling.SurgeonModelingError as e:
        raise ConfigError("model", str(e)) from None
    if getattr(config, modeling.CONFIG_KEY, None):
        cls = modeling.surgeon_class(cls)
    with torch.device("meta"):
        return cls._from_config(config)


def cast_parameters(params: Any, precision: Precision) -> None:
    """Trained parameters to the master dtype, frozen ones to the frozen dtype, in place (a
    parameter tied to another is cast once)."""
    for p in params:
        want = getattr(torch, precision.master if p.requires_grad else precision.frozen)
        if p.dtype != want and p.is_floating_point():
            p.data = p.data.to(want)


def _add_image_lora(model: torch.nn.Module, config: TrainConfig) -> None:
    """Attach Image-LoRA for the heads of ``config.image_lora``."""
    from surgeon.heads.score import read_heads
    from surgeon.modules.image_lora import ImageLoraConfig, add_image_lora

    if module_parameters(model, "image_lora"):
        raise ConfigError(
            "image_lora",
            f"{config.model} already has Image-LoRA adapters",
            "train from the base model with --image-lora (without it, LoRA would train the language model beside them)",
        )
    heads = read_heads(config.image_lora, "image_lora")  # type: ignore[arg-type]
    add_image_lora(model, heads, ImageLoraConfig(rank=config.image_lora_rank, alpha=config.image_lora_alpha))


IMAGE_LORA_SAMPLE = 256  # samples encoded for Image-LoRA's FLOPs report


def _image_lora_report(model: torch.nn.Module, config: TrainConfig, dataset: Any) -> dict[str, Any]:
    """Image-LoRA's statistics, with the FLOPs report over the first ``IMAGE_LORA_SAMPLE`` samples
    that have images (tokens and visual tokens; encoding them all would read every image); an
    error when the data has no visual token to adapt."""
    from surgeon.modules.image_lora import count_parameters, flops_report
    from surgeon.modules.modeling_surgeon import visual_token_ids

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    s = base.surgeon.image_lora.settings  # type: ignore[union-attr]
    ids = torch.tensor(visual_token_ids(model.config), dtype=torch.long)
    with_images = list(dataset.scanned.with_images[:IMAGE_LORA_SAMPLE]) if len(ids) else []
    encoded = [dataset[i] for i in with_images]
    visual = sum(int(torch.isin(e.input_ids, ids).sum()) for e in encoded)
    if visual == 0:
        why = "has no image or video placeholder token ids" if not len(ids) else f"sees no image or video in {config.data}"
        raise ConfigError(
            "image_lora", f"{config.model} {why}, so Image-LoRA (visual tokens only) would train nothing",
            "train on data with images, or without --image-lora",
        )
    tokens = sum(len(e) for e in encoded) or 1
    flops = flops_report(s["heads"], s["hidden_size"], s["num_kv_heads"], s["head_dim"], tokens, visual, s["rank"])
    params = count_parameters(s["heads"], s["hidden_size"], s["head_dim"], s["rank"])
    return {"heads": s["heads"], "parameters": params, "flops": flops.to_dict()}


def input_identities(run: Run, config: TrainConfig) -> dict[str, str]:
    """What a checkpoint records of the inputs whose change would silently change a resumed run:
    the base model's weights and the prior's (``Checkpoint.identity``)."""
    out = {"model": run.checkpoint.identity()}
    if config.prior:
        from surgeon.io.checkpoint import open_checkpoint

        with open_checkpoint(config.prior) as prior:
            out["prior"] = prior.identity()
    return out


def drift_for(run: Run, config: TrainConfig) -> Any:
    """The Drift object for ``config.prior`` (None without a prior): Δ on the parameters' device,
    each rank holding only the rows of its shards when the model is sharded."""
    if not config.prior:
        return None
    from surgeon.drift.bias import Drift

    return Drift.from_prior(run.model, config.prior, alpha=config.drift_alpha, scale=config.drift_scale, normalize=config.drift_normalize)


def check_memory(config: TrainConfig, ckpt: Any, processes: int, sharded: bool, precision: Precision, device: torch.device) -> None:
    """Stop before loading anything when the run's memory plan does not fit the device it runs
    on (``--gpu-memory``, or the GPU's memory; on the CPU the memory available to the machine's
    processes), with the plan in the message."""
    from surgeon.training.plan import device_budget, plan_memory

    found = device_budget(config.gpu_memory, device, processes)
    if found is None:
        return
    budget, source = found
    plan = plan_memory(config, ckpt.config, processes, sharded, precision, device.type, budget, source)
    if not plan.fits:
        raise ConfigError(
            "memory",
            f"the run needs about {plan.describe()} per process, more than the {_gb(budget)} {source}",
            "shard with --fsdp over more processes, or use --gradient-checkpointing, a smaller --batch-size / --max-length, LoRA or --param-dtype bf16 "
            "(surgeon train MODEL --dry-run shows the plan)",
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


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
        inputs: dict[str, Any] = {"model": run.checkpoint, "data": {"source": config.data, "sha256": run.data_fingerprint}}
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
