"""The model side of training: which parameters train, LoRA restricted to the language model.

LoRA targets are a regex anchored at the language model's own module path (found by identity,
``model.get_decoder()``), e.g. ``model\\.language_model\\.layers\\.\\d+\\.(self_attn\\.(q|k|v|o)_proj|…)``,
so it can never wrap a vision block even where vision blocks use the same leaf names (Qwen2.5-VL's
vision MLPs are also called ``gate_proj``/``up_proj``/``down_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from surgeon.errors import ConfigError, SelectionError

# Leaf module names of the language model that LoRA may wrap, by preset (peft's usual choices).
LORA_PRESETS = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}


def module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """The dotted name of ``module`` inside ``model`` (found by identity)."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``layers``, ``embed_tokens``, ``norm``) of a VLM or text LLM."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None or not hasattr(decoder, "layers"):
        raise ConfigError("model", f"cannot find the language model's decoder layers in {type(model).__name__}")
    return decoder


def lm_parameters(model: torch.nn.Module, buffers: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The language model's parameters under their LM-relative names (``layers.3.mlp.up_proj.weight``,
    ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``), the names priors use. As in
    ``surgeon.anatomy.layout.Layout``, decoder layers are numbered over the self-attention layers when the
    decoder interleaves cross-attention layers (Llama-3.2-Vision), which become ``cross_layers.N``.
    ``buffers``: also the persistent buffers (e.g. DeepSeek-V3's router correction bias), which
    checkpoints store beside the weights."""
    decoder = language_model(model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cross = sorted(getattr(text, "cross_attention_layers", None) or ())
    seen: set[int] = set()
    tensors = list(decoder.named_parameters())
    if buffers:
        persistent = {n for n, _ in decoder.state_dict().items()}
        tensors += [(n, b) for n, b in decoder.named_buffers() if n in persistent]
    for name, p in tensors:
        if not name.startswith("surgeon"):
            seen.add(id(p))
            m = re.match(r"layers\.(\d+)\.", name)
            if m and cross:
                i = int(m.group(1))
                name = f"cross_layers.{i}.{name[m.end():]}" if i in cross else f"layers.{i - sum(c < i for c in cross)}.{name[m.end():]}"
            yield name, p
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head.weight) not in seen:
        yield "lm_head.weight", head.weight


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


def vision_modules(model: torch.nn.Module) -> list[str]:
    """Module paths of the vision tower and projector: the language model's siblings that hold
    parameters (``model.visual``; ``model.vision_tower`` and ``model.multi_modal_projector`` …)."""
    path = module_path(model, language_model(model))
    parent = path.rpartition(".")[0]
    owner = model.get_submodule(parent) if parent else model
    decoder = language_model(model)
    return [
        f"{parent}.{name}" if parent else name
        for name, child in owner.named_children()
        if child is not decoder and any(True for _ in child.parameters()) and name != "surgeon"
    ]


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
    import warnings

    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name (what checkpoints save and the optimiser updates)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
