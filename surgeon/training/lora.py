"""The model side of training: which parameters train, LoRA restricted to the language model.

LoRA targets are a regex anchored at the language model's own module path (found by identity,
``model.get_decoder()``), e.g. ``model\\.language_model\\.layers\\.\\d+\\.(self_attn\\.(q|k|v|o)_proj|…)``,
so it can never wrap a vision block even where vision blocks use the same leaf names (Qwen2.5-VL's
vision MLPs are also called ``gate_proj``/``up_proj``/``down_proj``).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from surgeon.anatomy.decoder import language_model, lm_parameters, module_path, vision_modules
from surgeon.errors import ConfigError, SelectionError
from surgeon.modules.folders import peft_quietly

# Leaf module names of the language model that LoRA may wrap, by preset (peft's usual choices).
LORA_PRESETS = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}


def lora_target_regex(model: torch.nn.Module, presets: str) -> str:
    """A peft ``target_modules`` regex that matches only the language model's projections."""
    leaves: list[str] = []
    for preset in [p.strip() for p in presets.split(",") if p.strip()]:
        if preset not in LORA_PRESETS:
            raise SelectionError("LoRA target preset", preset, LORA_PRESETS)
        leaves += LORA_PRESETS[preset]
    if not leaves:
        raise SelectionError("LoRA target preset", presets, LORA_PRESETS)
    prefix = module_path(model, language_model(model))
    layers = re.escape(f"{prefix}.layers." if prefix else "layers.")
    pattern = rf"{layers}\d+\.({'|'.join(re.escape(leaf) for leaf in leaves)})"
    names = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    if not names:
        available = sorted({n.split(".", 3)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise SelectionError("LoRA targets", pattern, available[:20])
    return pattern


def set_trainable(model: torch.nn.Module, full: bool, train_vision: bool) -> None:
    """Freeze everything, then unfreeze the language model (``full``), the vision tower and
    projector (``train_vision``) and any surgeon modules. LoRA parameters and peft's
    ``modules_to_save`` copies are left as peft set them."""
    lm = {id(p) for _, p in lm_parameters(model)}
    for name, p in model.named_parameters():
        is_lm = id(p) in lm
        if "lora_" in name or ".modules_to_save." in name:  # peft owns these
            continue
        p.requires_grad_((full and is_lm) or (train_vision and not is_lm) or "surgeon" in name.split("."))


def apply_lora(
    model: torch.nn.Module, rank: int, alpha: float, targets: str, dropout: float = 0.0, train_vision: bool = False
) -> Any:
    """Wrap the language model's projections with peft LoRA; returns the PeftModel.

    ``train_vision``: the vision tower and projector train fully as peft ``modules_to_save``, so
    the adapter folder carries them."""
    from peft import LoraConfig, get_peft_model

    save = vision_modules(model) if train_vision else None
    if train_vision and not save:
        raise ConfigError("train_vision", f"{type(model).__name__} has no vision tower to train", "drop --train-vision")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_regex(model, targets), bias="none",
        modules_to_save=save,
    )  # fmt: skip
    with peft_quietly():
        return get_peft_model(model, config)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name (what checkpoints save and the optimiser updates)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
