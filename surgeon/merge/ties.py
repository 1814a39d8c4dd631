"""``ties`` (Yadav et al. 2023): trim each τ_i to its top-density fraction by magnitude (per
tensor), elect each entry's sign as the sign of Σ_i τ_i, average the agreeing entries
(disjoint mean), θ = θ_V + w·τ_merged (docs/methods.md §2). With one reasoning model: θ_V + w·trim(τ).

Defaults (not specified by the paper; surgeon defaults): w = 0.5, density = 0.2 (the TIES
paper's top-20 %).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from surgeon.merge.method import MergeMethod, TensorContext
from surgeon.merge.sparsify import disjoint_mean, trim


def combine(base: torch.Tensor, reasoning: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    taus = [trim(r.sub_(base), t) for r, t in zip(reasoning, ctx.thresholds, strict=True)]
    return disjoint_mean(taus).mul_(ctx.weight).add_(base)  # = base + w·mean, in the tiles' scratch


METHOD = MergeMethod(
    name="ties",
    summary="θ_V + w·disjoint_mean(trim_density(τ_i))",
    combine=combine,
    title="TIES",
    reference="Yadav et al. 2023",
    options=frozenset({"weight", "density"}),
    defaults={"weight": 0.5, "density": 0.2},
    trims=True,
)
