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

    d = Distance(tensors=1)
    d.add_gram(gram)          # float64 Gram matrix of [θ(VLM), Δ], summed over fp32 tiles
    d.to_dict()               # {"tensors": 1, "delta_norm": …, "cosine": …}
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from surgeon.anatomy.families import FAMILIES

EPS = 1e-12


@dataclass
class Distance:
    """Running float64 sums for one tensor or a group of tensors."""

    tensors: int = 0
    delta_sq: float = 0.0
    vlm_sq: float = 0.0
    paired_vlm_sq: float = 0.0
    reasoning_sq: float = 0.0
    dot: float = 0.0

    def add_gram(self, gram: torch.Tensor, delta_from_vlm: bool = True) -> None:
        """Paired rows, given the Gram matrix (float64) of their flattened fp32 blocks.

        ``delta_from_vlm`` (single mode, Δ = θ(R) − θ(VLM)): ``gram`` is of ``[θ(VLM), Δ]``. That
        is the more accurate form: ⟨R,V⟩ = ‖V‖² + ⟨Δ,V⟩ and ‖R‖² = ‖V‖² + 2⟨Δ,V⟩ + ‖Δ‖², so
        1 − cosine is carried by the small terms instead of by the difference of two large ones.
        Otherwise (two-model mode, Δ = θ(R) − θ(base)): ``gram`` is of ``[θ(R), θ(VLM), …, Δ]``.
        """
        g = gram.tolist()
        dd = g[-1][-1]
        self.delta_sq += dd
        if delta_from_vlm:
            vv, dv = g[0][0], g[0][1]
            self.dot += vv + dv
            self.reasoning_sq += vv + 2 * dv + dd
        else:
            vv = g[1][1]
            self.dot += g[0][1]
            self.reasoning_sq += g[0][0]
        self.vlm_sq += vv
        self.paired_vlm_sq += vv

    def add_vlm_sq(self, value: float) -> None:
        """VLM rows with no counterpart (extra vocabulary): their ‖θ(VLM)‖² counts in vlm_norm only."""
        self.vlm_sq += value

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
