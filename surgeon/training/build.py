"""A run built from its config: data encoded lazily, the model loaded (or planned on the meta
device) with its surgeon modules, LoRA or full fine-tuning, and the trainable parameters chosen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import ConfigError
from surgeon.modules.folders import load_model, module_parameters
from surgeon.modules.iada import IadaConfig, add_iada
from surgeon.training.config import Precision, TrainConfig
from surgeon.training.lora import apply_lora, set_trainable, trainable


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
    data_hub: dict[str, str] | None  # a Hub dataset's revision and commit
    has_surgeon_modules: bool
    stats: dict[str, Any] = field(default_factory=dict)


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
        data_hub=getattr(scanned.rows, "hub", None),
        has_surgeon_modules=bool(extra["surgeon_modules"]),
        stats={"data": dataset.stats.to_dict(), "trainable_parameters": n_train, "parameters": n_total, **extra},
    )


def build_model(config: TrainConfig, source: str | Path | dict, dtype: str) -> torch.nn.Module:
    """The model a run trains, without its data: loaded from ``source`` (a model folder) in
    ``dtype`` (a torch dtype name, or ``auto`` for the checkpoint's own), or, for a config.json
    dict, built empty on the meta device (memory plans); then IADA / Image-LoRA modules added,
    gradient checkpointing on, LoRA applied or the language model unfrozen, every other
    parameter frozen. The same options always give the same structure and parameter names.
    A meta-device build leaves the random number generators as they were (checks and plans
    before a run must not change its initialisation)."""
    if isinstance(source, dict):
        with torch.random.fork_rng(devices=[]):
            return _finish(config, empty_model(source))
    return _finish(config, load_model(source, dtype=dtype if dtype == "auto" else getattr(torch, dtype)))


def _finish(config: TrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    """``build_model`` after loading: surgeon modules, checkpointing, LoRA or unfreezing."""
    if config.packing or config.attn != "sdpa":
        from surgeon.training.attention import set_attention

        set_attention(model, config.attn, config.packing)
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
        set_trainable(model, full=True, train_vision=config.train_vision, selection=config.selection)
        return model
    lora = not config.image_lora  # Image-LoRA trains alone: no LoRA on the language model, which stays frozen
    if lora:  # with --train-vision, peft trains and saves the vision tower and projector (modules_to_save)
        model = apply_lora(
            model, config.lora_rank, config.lora_alpha, config.selection, config.lora_dropout, config.train_vision, config.selection_given
        )
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


def drift_for(run: Run, config: TrainConfig, reduce: Any = None, grad_scale: float = 1.0) -> Any:
    """The DRIFT object for ``config.prior`` (None without a prior): ``Drift`` on the full weights
    (``--full``), ``LoraDrift`` through the LoRA adapters otherwise; Δ on the parameters' device,
    each rank holding only the rows of its shards when the model is sharded. ``reduce``: an
    in-place sum over processes (LoRA's per-process k); ``grad_scale``: 1 / the engine's loss scale."""
    if not config.prior:
        return None
    if not config.full:
        from surgeon.drift.lora import LoraDrift

        return LoraDrift.from_prior(run.model, config.prior, config.drift_alpha, config.drift_scale, config.drift_normalize, reduce, grad_scale)
    from surgeon.drift.bias import Drift

    return Drift.from_prior(
        run.model, config.prior, alpha=config.drift_alpha, scale=config.drift_scale, normalize=config.drift_normalize, trained_only=True
    )
