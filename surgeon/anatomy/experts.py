"""Mixture-of-experts weights in their two on-disk layouts, read as the same logical tensors.

Text MoE checkpoints (Qwen3-MoE, Qwen2-MoE, DeepSeek, Mixtral …) store each expert's projections
separately; transformers ≥ 5 fuses them in memory, and some VLMs save them fused (Qwen3-VL-MoE):

    per expert   layers.N.mlp.experts.E.gate_proj.weight  [f, d]   (Mixtral: w1)
                 layers.N.mlp.experts.E.up_proj.weight    [f, d]   (w3)
                 layers.N.mlp.experts.E.down_proj.weight  [d, f]   (w2)
    fused        layers.N.mlp.experts.gate_up_proj   [E, 2f, d]  (transformers' memory order)
                                                     or [E, d, 2f] (the released Qwen3-VL-MoE files)
                 layers.N.mlp.experts.down_proj      [E, d, f]   or [E, f, d]

where ``gate_up_proj[e]`` is ``gate_e`` followed by ``up_e`` along the 2f axis (transformers
splits it with ``chunk(2)``: gate first). ``expert_view(vrel, lrel, vlm, llm)`` finds the fused
tensors of one side whose counterpart the other side stores per expert (or fused in the other
orientation) and returns a ``View`` of the LLM checkpoint that serves the LLM's weights under the
VLM's layout, one expert (row) at a time, so priors and merges stream them like any tensor and Δ is
stored under the VLM's own names and shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from surgeon.io.header import DTYPE_SIZES, TensorInfo
from surgeon.io.safetensors import DTYPES

_FUSED = re.compile(r"^(?P<base>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(?P<base>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


@dataclass(frozen=True)
class Virtual:
    """A logical tensor assembled from stored ones: ``rows(start, stop)`` returns its rows."""

    info: TensorInfo
    rows: Callable[[int, int], torch.Tensor]


class View:
    """A checkpoint with extra, virtual tensors (read row block by row block, like stored ones).
    Everything else is the wrapped checkpoint's."""

    def __init__(self, ckpt: Any, virtual: dict[str, Virtual]) -> None:
        self._ckpt = ckpt
        self._virtual = virtual
        self.tensors = {**ckpt.tensors, **{name: v.info for name, v in virtual.items()}}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ckpt, name)

    def read(self, name: str, rows: int | None = None, start: int = 0) -> torch.Tensor:
        v = self._virtual.get(name)
        if v is None:
            return self._ckpt.read(name, rows, start)
        stop = v.info.shape[0] if rows is None else min(start + rows, v.info.shape[0])
        return v.rows(start, stop)

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        v = self._virtual.get(name)
        if v is None:
            return self._ckpt.read_into(name, out, start)
        return out.copy_(v.rows(start, start + out.shape[0]).view(out.shape))


def expert_view(
    vrel: dict[str, str], lrel: dict[str, str], vlm: Any, llm: Any
) -> tuple[Any, dict[str, str], set[str], list[str]]:
    """``(view of llm, LM-relative name -> LLM name added for the VLM's expert tensors, the LLM
    tensors those are read from, notes)``.

    The view serves, under virtual names, the LLM's experts in the VLM's layout: fused from
    per-expert tensors, split from fused ones, or fused in the other orientation."""
    virtual: dict[str, Virtual] = {}
    added: dict[str, str] = {}
    consumed: set[str] = set()
    notes: list[str] = []
    fused_v = {rel: m for rel in vrel if (m := _FUSED.match(rel))}
    per_l = _per_expert(lrel)
    for rel, m in fused_v.items():
        info = vlm.tensors[vrel[rel]]
        made = None
        if rel in lrel:
            if _swapped(rel, lrel, llm, info):  # both fused, in the two orientations
                made = _transpose(info, lrel[rel], llm)
                consumed.add(lrel[rel])
        elif m["base"] in per_l:
            made = _fuse(info, m["kind"], per_l[m["base"]], lrel, llm, m["base"], vlm.tensors, vrel)
            if made is not None:
                roles = {"gate", "up"} if m["kind"] == "gate_up_proj" else {"down"}
                consumed |= {lrel[r] for projs in per_l[m["base"]].values() for p, r in projs.items() if _ROLE[p] in roles}
        if made is not None:
            name = f"{rel} (fused from {llm.source})"
            virtual[name], added[rel] = made, name
    per_v = _per_expert({r: n for r, n in vrel.items() if r not in lrel})
    for base, experts in per_v.items():
        for kind in ("gate_up_proj", "down_proj"):
            fused = lrel.get(f"{base}.{kind}")
            if fused is None:
                continue
            for e, projs in experts.items():
                for proj, rel in projs.items():
                    if (kind == "down_proj") != (_ROLE[proj] == "down"):
                        continue
                    made = _split(vlm.tensors[vrel[rel]], llm.tensors[fused], llm, fused, e, _ROLE[proj])
                    if made is not None:
                        name = f"{rel} (from {fused} of {llm.source})"
                        virtual[name], added[rel] = made, name
                        consumed.add(fused)
    if added:
        notes.append(f"{len(added)} mixture-of-experts tensor(s) paired across the per-expert and fused layouts")
    return (View(llm, virtual) if virtual else llm), added, consumed, notes


def _per_expert(rel: dict[str, str]) -> dict[str, dict[int, dict[str, str]]]:
    """base -> expert -> projection -> LM-relative name, for per-expert tensors."""
    out: dict[str, dict[int, dict[str, str]]] = {}
    for r in rel:
        m = _PER_EXPERT.match(r)
        if m:
            out.setdefault(m["base"], {}).setdefault(int(m["e"]), {})[m["proj"]] = r
    return out


def _swapped(rel: str, lrel: dict[str, str], llm: Any, info: TensorInfo) -> bool:
    shape = tuple(llm.tensors[lrel[rel]].shape)
    return len(info.shape) == 3 and shape != tuple(info.shape) and shape == (info.shape[0], info.shape[2], info.shape[1])


def _virtual_info(info: TensorInfo, dtype: str) -> TensorInfo:
    """``info``'s name and shape with another dtype, as a tensor stored nowhere."""
    nbytes = info.numel * DTYPE_SIZES[dtype]
    return replace(info, dtype=dtype, file="(virtual)", start=0, end=nbytes)


def _orientation(kind: str, shape: tuple[int, ...], f: int, d: int, other: tuple[int, ...] | None) -> str | None:
    """``"memory"`` ([E, 2f, d] / [E, d, f]) or ``"original"`` ([E, d, 2f] / [E, f, d]) for a fused
    tensor; ``other`` is the companion fused tensor's shape, which decides when 2f == d."""
    width = 2 * f if kind == "gate_up_proj" else d
    depth = d if kind == "gate_up_proj" else f
    memory, original = (width, depth), (depth, width)
    options = [o for o, s in (("memory", memory), ("original", original)) if tuple(shape[1:]) == s]
    if len(options) == 1:
        return options[0]
    if len(options) == 2 and other is not None:
        companion = "down_proj" if kind == "gate_up_proj" else "gate_up_proj"
        return _orientation(companion, other, f, d, None)
    return None


def _fuse(
    info: TensorInfo, kind: str, experts: dict[int, dict[str, str]], lrel: dict[str, str], llm: Any, base: str,
    vlm_tensors: dict[str, TensorInfo], vrel: dict[str, str],
) -> Virtual | None:  # fmt: skip
    """The VLM's fused tensor built from the LLM's per-expert ones (None when they do not fit)."""
    n = info.shape[0] if len(info.shape) == 3 else -1
    if n != len(experts) or sorted(experts) != list(range(n)):
        return None
    roles = ("gate", "up") if kind == "gate_up_proj" else ("down",)
    names: list[list[str]] = []
    for e in range(n):
        by_role = {_ROLE[p]: lrel[r] for p, r in experts[e].items()}
        if not all(role in by_role for role in roles):
            return None
        names.append([by_role[role] for role in roles])
    gate_shape = llm.tensors[lrel[next(r for p, r in experts[0].items() if _ROLE[p] == "gate")]].shape
    f, d = gate_shape
    companion = f"{base}.{'down_proj' if kind == 'gate_up_proj' else 'gate_up_proj'}"
    other = vlm_tensors[vrel[companion]].shape if companion in vrel else None
    orient = _orientation(kind, tuple(info.shape), f, d, tuple(other) if other else None)
    if orient is None:
        return None
    dtype = llm.tensors[names[0][0]].dtype

    def rows(start: int, stop: int) -> torch.Tensor:
        out = []
        for e in range(start, stop):
            parts = [llm.read(name) for name in names[e]]
            x = torch.cat(parts, 0) if len(parts) > 1 else parts[0]  # [2f, d] (gate, then up) or [d, f]
            out.append(x if orient == "memory" else x.t())
        return torch.stack(out).contiguous() if out else torch.empty((0, *info.shape[1:]), dtype=DTYPES[llm.tensors[names[0][0]].dtype])

    return Virtual(_virtual_info(info, dtype), rows)


def _transpose(info: TensorInfo, name: str, llm: Any) -> Virtual | None:
    """The LLM's fused tensor in the VLM's orientation (the last two dimensions swapped)."""
    src = llm.tensors[name]
    if tuple(src.shape) == tuple(info.shape):
        return None
    if tuple(src.shape) != (info.shape[0], info.shape[2], info.shape[1]):
        return None

    def rows(start: int, stop: int) -> torch.Tensor:
        return llm.read(name, rows=stop - start, start=start).transpose(1, 2).contiguous()

    return Virtual(_virtual_info(info, src.dtype), rows)


def _split(info: TensorInfo, fused: TensorInfo, llm: Any, name: str, e: int, role: str) -> Virtual | None:
    """One expert's projection (a VLM per-expert tensor) cut from the LLM's fused tensor."""
    if len(fused.shape) != 3 or e >= fused.shape[0]:
        return None
    out_dim, in_dim = info.shape  # nn.Linear: [out, in]
    if role == "down":  # [d, f] per expert
        orient = "memory" if tuple(fused.shape[1:]) == (out_dim, in_dim) else "original" if tuple(fused.shape[1:]) == (in_dim, out_dim) else None
    else:  # gate/up [f, d]; fused [2f, d] or [d, 2f]
        orient = "memory" if tuple(fused.shape[1:]) == (2 * out_dim, in_dim) else "original" if tuple(fused.shape[1:]) == (in_dim, 2 * out_dim) else None
    if orient is None:
        return None

    def rows(start: int, stop: int) -> torch.Tensor:
        x = llm.read(name, rows=1, start=e)[0]
        x = x if orient == "memory" else x.t()
        if role != "down":
            x = x[:out_dim] if role == "gate" else x[out_dim:]
        return x[start:stop].contiguous()

    return Virtual(_virtual_info(info, fused.dtype), rows)


def fused_groups(relatives: list[str], parameters: dict[str, Any]) -> dict[str, dict[int, list[str]]]:
    """Per-expert LM-relative names grouped under the fused parameter that holds them in memory
    (transformers ≥ 5 fuses a per-expert checkpoint's experts when it loads it):
    ``{"layers.1.mlp.experts.gate_up_proj": {0: [gate, up], 1: [...]}, "…down_proj": {0: [down]}}``,
    for the names whose fused parameter exists in ``parameters``."""
    out: dict[str, dict[int, dict[str, str]]] = {}
    for rel in relatives:
        m = _PER_EXPERT.match(rel)
        if not m:
            continue
        kind = "down_proj" if _ROLE[m["proj"]] == "down" else "gate_up_proj"
        fused = f"{m['base']}.{kind}"
        if fused in parameters:
            out.setdefault(fused, {}).setdefault(int(m["e"]), {})[_ROLE[m["proj"]]] = rel
    order = {"gate": 0, "up": 1, "down": 0}
    return {
        fused: {e: [r for role, r in sorted(roles.items(), key=lambda kv: order[kv[0]])] for e, roles in experts.items()}
        for fused, experts in out.items()
        if all(len(roles) == (1 if fused.endswith("down_proj") else 2) for roles in experts.values())
    }
