"""The model side of training: which parameters train, chosen with the ``--modules``/``--layers``
grammar of ``prior`` and ``merge`` (``surgeon.anatomy.families``) on LM-relative names.

LoRA wraps the selected linear layers of the language model through a regex of their exact module
paths (``model\\.language_model\\.layers\\.(?:\\d+)\\.(?:mlp\\.down_proj|…)``), so it never wraps a
vision block even where vision blocks use the same leaf names (Qwen2.5-VL's vision MLPs are also
called ``gate_proj``/``up_proj``/``down_proj``); ``--full`` trains the selected tensors and freezes
the rest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch

from surgeon.anatomy.decoder import lm_parameters, vision_modules
from surgeon.anatomy.families import Selection, family, parse_modules, select
from surgeon.anatomy.layout import layer_index
from surgeon.errors import ConfigError
from surgeon.modules.folders import peft_quietly

# Linear modules a preset never hands LoRA (a router's logits decide which experts run; an
# ``re:`` pattern may still select them).
ROUTERS = {"gate", "router", "shared_expert_gate", "gate_layer"}


def lm_linears(model: torch.nn.Module) -> dict[str, str]:
    """LM-relative weight name -> module path for each ``torch.nn.Linear`` of the language model
    (an output head tied to the embeddings is left out: its weight is the embedding's)."""
    rel_of = {id(p): rel for rel, p in lm_parameters(model)}
    out: dict[str, str] = {}
    for path, m in model.named_modules():
        rel = rel_of.get(id(getattr(m, "weight", None)))
        if isinstance(m, torch.nn.Linear) and rel is not None and family(rel) != "embed":
            out[rel] = path
    return out


def num_layers(relatives: Iterable[str]) -> int:
    """Decoder layers of a model, from its LM-relative names."""
    return 1 + max((i for i in map(layer_index, relatives) if i is not None), default=-1)


def lora_modules(model: torch.nn.Module, selection: Selection, strict: bool = True) -> dict[str, str]:
    """The language model's linear layers ``selection`` picks for LoRA (weight name -> module
    path); routers only through an ``re:`` item. SelectionError when nothing matches, or (``strict``,
    a selection the user gave) when one item does; the default attn,mlp wraps what there is (a
    mixture of experts with fused expert tensors has no MLP linear layers)."""
    linears = lm_linears(model)
    names = [rel for rel in linears if rel.rsplit(".", 2)[-2] not in ROUTERS] + [
        rel for rel in linears if rel.rsplit(".", 2)[-2] in ROUTERS and any(m.startswith("re:") and selection.matches_module(m, rel) for m in selection.modules)
    ]  # fmt: skip
    everything = [rel for rel, _ in lm_parameters(model)]
    _check_layer_range(selection, everything)
    candidates = [n for n in everything if n in set(names)]
    if not strict:
        items = tuple(m for m in selection.modules if any(selection.matches_module(m, n) for n in candidates))
        selection = replace(selection, modules=items or selection.modules)
    chosen = select(candidates, selection)
    return {rel: linears[rel] for rel in chosen}


def _check_layer_range(selection: Selection, relatives: list[str]) -> None:
    select(relatives, Selection(("full",), selection.layers, selection.skip_first, True), num_layers(relatives))


def lora_target_regex(model: torch.nn.Module, selection: Selection | str, strict: bool = True) -> str:
    """A peft ``target_modules`` regex (``re.fullmatch`` on module paths) that matches exactly the
    modules ``lora_modules`` picks, compacted per layer list:
    ``model\\.language_model\\.layers\\.(?:\\d+)\\.(?:self_attn\\.q_proj|…)``. ``selection`` may be
    ``--modules`` text (``"attn,mlp"``)."""
    if isinstance(selection, str):
        selection = Selection(parse_modules(selection))
    paths = sorted(lora_modules(model, selection, strict).values())
    every: dict[str, set[str]] = {}
    for path, _ in model.named_modules():
        m = re.fullmatch(r"(.*\.)?layers\.(\d+)", path)
        if m:
            every.setdefault(m.group(1) or "", set()).add(m.group(2))
    groups: dict[tuple[str, str], set[str]] = {}
    alone: list[str] = []
    for path in paths:
        m = re.fullmatch(r"((?:.*\.)?layers\.)(\d+)\.(.+)", path)
        if m:
            groups.setdefault((m.group(1), m.group(3)), set()).add(m.group(2))
        else:
            alone.append(re.escape(path))
    by_layers: dict[tuple[str, frozenset[str]], list[str]] = {}
    for (head, tail), layers in groups.items():
        by_layers.setdefault((head, frozenset(layers)), []).append(tail)
    parts = list(alone)
    for (head, layers), tails in by_layers.items():
        nums = r"\d+" if layers == every.get(head[: -len("layers.")], set()) else "|".join(sorted(layers, key=int))
        parts.append(f"{re.escape(head)}(?:{nums})\\.(?:{'|'.join(re.escape(t) for t in sorted(tails))})")
    pattern = parts[0] if len(parts) == 1 else "(?:" + "|".join(f"(?:{p})" for p in parts) + ")"
    assert sorted(n for n, _ in model.named_modules() if re.fullmatch(pattern, n)) == paths, pattern
    return pattern


def set_trainable(model: torch.nn.Module, full: bool, train_vision: bool, selection: Selection | None = None) -> list[str]:
    """Freeze everything, then unfreeze the language model (``full``: the LM-relative tensors
    ``selection`` picks, all of them without one), the vision tower and projector
    (``train_vision``) and any surgeon modules. LoRA parameters and peft's ``modules_to_save``
    copies are left as peft set them. Returns the LM-relative names of the trained LM tensors."""
    named = list(lm_parameters(model))
    chosen = [rel for rel, _ in named] if full else []
    if full and selection is not None:
        _check_layer_range(selection, chosen)
        chosen = select(chosen, selection)
    keep = {id(p) for rel, p in named if rel in set(chosen)}
    lm = {id(p) for _, p in named}
    for name, p in model.named_parameters():
        if "lora_" in name or ".modules_to_save." in name:  # peft owns these
            continue
        is_lm = id(p) in lm
        p.requires_grad_((id(p) in keep) or (train_vision and not is_lm) or "surgeon" in name.split("."))
    return chosen


def apply_lora(
    model: torch.nn.Module, rank: int, alpha: float, targets: Selection | str, dropout: float = 0.0, train_vision: bool = False,
    strict: bool = True,
) -> Any:
    """Wrap the language model's linear layers that ``targets`` selects (``--modules`` grammar)
    with peft LoRA; returns the PeftModel.

    ``train_vision``: the vision tower and projector train fully as peft ``modules_to_save``, so
    the adapter folder carries them."""
    from peft import LoraConfig, get_peft_model

    save = vision_modules(model) if train_vision else None
    if train_vision and not save:
        raise ConfigError("train_vision", f"{type(model).__name__} has no vision tower to train", "drop --train-vision")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_regex(model, targets, strict), bias="none",
        modules_to_save=save,
    )  # fmt: skip
    with peft_quietly():
        return get_peft_model(model, config)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name (what checkpoints save and the optimiser updates)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
