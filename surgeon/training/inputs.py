"""Before anything is loaded: the inputs of a run checked, its memory plan held against the device,
and the identity of the inputs a checkpoint records (``--resume`` refuses changed ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surgeon.errors import ConfigError
from surgeon.training.config import Precision, TrainConfig


def check_inputs(config: TrainConfig) -> Any:
    """Fail fast, before anything slow, on inputs that cannot work; returns the model checkpoint."""
    from surgeon.hub.sources import open_checkpoint
    from surgeon.errors import DataError

    from surgeon.data.rows import looks_like_hub_dataset

    if not Path(config.data).exists() and not looks_like_hub_dataset(config.data):  # type: ignore[arg-type]
        raise DataError(config.data, "no such file", "give a .jsonl or .parquet file, a save_to_disk folder, or a Hub dataset id")  # type: ignore[arg-type]
    if config.prior:
        from surgeon.drift.prior import open_prior

        open_prior(config.prior).close()
    from surgeon.training.attention import check_attn, check_packable

    check_attn(config.attn, "cuda" if torch.cuda.is_available() else "cpu")
    ckpt = open_checkpoint(config.model)
    from surgeon.anatomy.limits import check_checkpoint

    check_checkpoint(ckpt)
    if config.packing:
        check_packable(ckpt.config, config.model)
    if not config.image_lora and (config.prior or config.modules is not None or config.layers is not None):
        check_selection(config, ckpt.config)
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


def check_selection(config: TrainConfig, model_config: dict) -> list[str]:
    """``--modules``/``--layers`` and the prior held against the model's structure (built on the
    meta device from config.json, no weights read): a layer outside the model, a preset or pattern
    that matches nothing (the error lists what is there), or a prior without Δ for what DRIFT is to
    bias (every LoRA-adapted weight; with ``--full``, every tensor an explicit ``--modules``/``--layers``
    selects, and at least one trained tensor) stop the run here. Returns the LM-relative names of
    the selected tensors (the adapted weights with LoRA)."""
    from surgeon.anatomy.decoder import lm_parameters
    from surgeon.training.build import build_model

    model = build_model(config, model_config, "auto")
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    named = dict(lm_parameters(root))
    if config.full:
        chosen = [rel for rel, p in named.items() if p.requires_grad]
    else:
        chosen = [rel.replace(".base_layer.", ".") for rel in named if ".base_layer." in rel and rel.endswith(".weight")]
    if config.prior:
        _check_prior_covers(config, chosen, {rel.replace(".base_layer.", "."): p for rel, p in named.items()})
    return chosen


def _check_prior_covers(config: TrainConfig, chosen: list[str], parameters: dict[str, Any]) -> None:
    from surgeon.anatomy.experts import fused_groups
    from surgeon.drift.prior import open_prior

    with open_prior(config.prior) as p:  # type: ignore[arg-type]
        has = {p.relative(n) for n in p.names}
    has |= set(fused_groups(sorted(has), parameters))
    must = chosen if not config.full or config.modules is not None or config.layers is not None else []
    missing = [rel for rel in must if rel not in has]
    what = "LoRA-adapted weights" if not config.full else "selected tensors"
    if missing:
        raise ConfigError(
            "prior", f"{config.prior} has no Δ for {len(missing)} of the {len(chosen)} {what}, e.g. {missing[0]}",
            "compute the prior with --modules/--layers covering them, or narrow train's --modules/--layers to what it covers",
        )  # fmt: skip
    if not any(rel in has for rel in chosen):
        raise ConfigError("prior", f"{config.prior} has Δ for none of the {len(chosen)} {what}", "use a prior computed for this model's language model")


def input_identities(run: Any, config: TrainConfig) -> dict[str, str]:
    """What a checkpoint records of the inputs whose change would silently change a resumed run:
    the base model's weights and the prior's (``Checkpoint.identity``)."""
    out = {"model": run.checkpoint.identity()}
    if config.prior:
        from surgeon.hub.sources import open_checkpoint

        with open_checkpoint(config.prior) as prior:
            out["prior"] = prior.identity()
    return out


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
