"""How far a reasoning LLM's weights are from a VLM's: the statistics behind every prior.

For a tensor m with prior Δ_m (paired rows only, see ``align.Pair.rows``):

    delta_norm        ‖Δ_m‖
    vlm_norm          ‖θ_m(VLM)‖ over the whole VLM tensor (what Δ is normalised against in training)
    relative_distance ‖Δ_m‖ / max(‖θ_m(VLM)‖, eps)
    cosine            ⟨θ_m(R), θ_m(VLM)⟩ / max(‖θ_m(R)‖·‖θ_m(VLM)‖, eps)   over the paired rows

Groups (a decoder layer, a module family, all tensors) combine their tensors as one flattened
vector: norms are square roots of summed squares, the cosine is the summed dot product over the
product of the summed norms. DRIFT's authors use the per-layer distance and cosine to explain why
merging helps some VLM/LLM pairs and hurts others ("merging is not a free lunch").

    d = Distance()
    for stacked in blocks:                 # fp32 blocks of rows: [θ(R), θ(VLM), Δ]
        d.add_block(stacked)
    d.to_dict()                            # {"tensors": 1, "delta_norm": …, "cosine": …}
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from surgeon.families import FAMILIES

EPS = 1e-12


def _sq(x: torch.Tensor) -> float:
    flat = x.reshape(-1)
    return float(torch.dot(flat, flat))


@dataclass
class Distance:
    """Running sums for one tensor or a group of tensors (fp32 blocks in, float64 sums)."""

    tensors: int = 0
    delta_sq: float = 0.0
    vlm_sq: float = 0.0
    paired_vlm_sq: float = 0.0
    reasoning_sq: float = 0.0
    dot: float = 0.0

    def add_block(self, stacked: torch.Tensor, delta_from_vlm: bool = True) -> None:
        """Paired rows: ``stacked`` holds fp32 blocks ``[θ(R), θ(VLM), …, Δ]`` of one shape.

        Its Gram matrix gives every sum in one pass over memory. With ``delta_from_vlm``
        (Δ = θ(R) − θ(VLM), single mode) only θ(VLM) and Δ are needed, and they are the more
        accurate: ⟨R,V⟩ = ‖V‖² + ⟨Δ,V⟩ and ‖R‖² = ‖V‖² + 2⟨Δ,V⟩ + ‖Δ‖², so 1 − cosine is carried by
        the small terms instead of by the difference of two large ones. In two-model mode
        (Δ = θ(R) − θ(base)) the Gram matrix of all rows is used.
        """
        rows = stacked[1:] if delta_from_vlm and stacked.shape[0] == 3 else stacked
        flat = rows.reshape(rows.shape[0], -1)
        g = (flat @ flat.T).double()
        last = g.shape[0] - 1
        dd = float(g[last, last])
        self.delta_sq += dd
        if rows is not stacked:  # [V, Δ]
            vv, dv = float(g[0, 0]), float(g[0, 1])
            self.dot += vv + dv
            self.reasoning_sq += vv + 2 * dv + dd
        else:  # [R, V, …, Δ]
            vv = float(g[1, 1])
            self.dot += float(g[0, 1])
            self.reasoning_sq += float(g[0, 0])
        self.vlm_sq += vv
        self.paired_vlm_sq += vv

    def add_vlm_rows(self, vlm: torch.Tensor) -> None:
        """VLM rows with no counterpart (extra vocabulary): they count in ‖θ(VLM)‖ only."""
        self.vlm_sq += _sq(vlm)

    def merge(self, other: Distance) -> None:
        self.tensors += other.tensors
        self.delta_sq += other.delta_sq
        self.vlm_sq += other.vlm_sq
        self.paired_vlm_sq += other.paired_vlm_sq
        self.reasoning_sq += other.reasoning_sq
        self.dot += other.dot

    @property
    def delta_norm(self) -> float:
        return math.sqrt(self.delta_sq)

    @property
    def vlm_norm(self) -> float:
        return math.sqrt(self.vlm_sq)

    @property
    def relative_distance(self) -> float:
        return self.delta_norm / max(self.vlm_norm, EPS)

    @property
    def cosine(self) -> float:
        return self.dot / max(math.sqrt(self.reasoning_sq) * math.sqrt(self.paired_vlm_sq), EPS)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "tensors": self.tensors,
            "delta_norm": self.delta_norm,
            "vlm_norm": self.vlm_norm,
            "relative_distance": self.relative_distance,
            "cosine": self.cosine,
        }


def summarise(items: Iterable[tuple[int | None, str, Distance]]) -> tuple[list[dict], list[dict], dict]:
    """Group per-tensor distances ``(layer, family, distance)`` into per-layer rows, per-family
    rows and a total. Decoder layers come first in order (``"layer": 3``); tensors outside the
    layers get one row per family (``"layer": "embed"``)."""
    layers: dict[int | str, Distance] = {}
    families: dict[str, Distance] = {}
    total = Distance()
    for layer, fam, d in items:
        key: int | str = layer if layer is not None else fam
        layers.setdefault(key, Distance()).merge(d)
        families.setdefault(fam, Distance()).merge(d)
        total.merge(d)
    order = sorted(layers, key=lambda k: (1, str(k)) if isinstance(k, str) else (0, f"{k:09d}"))
    layer_rows = [{"layer": k, **layers[k].to_dict()} for k in order]
    fam_order = sorted(families, key=lambda f: FAMILIES.index(f) if f in FAMILIES else len(FAMILIES))
    family_rows = [{"family": f, **families[f].to_dict()} for f in fam_order]
    return layer_rows, family_rows, total.to_dict()
