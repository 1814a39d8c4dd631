"""``dare-ties`` (Yu et al. 2024 with TIES' sign election): DARE each τ_i (drop with probability
1−density, rescale by 1/density), elect signs by the sign of the sum, average the agreeing
entries, θ = θ_V + w·τ_merged (docs/methods.md §2). DARE replaces TIES' magnitude trim.

Seeded as ``dare-linear``. Defaults (not specified by the paper; surgeon defaults): w = 0.5,
density = 0.5, seed = 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from surgeon.merge.method import MergeMethod, TensorContext
from surgeon.merge.sparsify import dare, disjoint_mean


def combine(base: torch.Tensor, reasoning: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    taus = [dare(r.sub_(base), ctx.density, g) for r, g in zip(reasoning, ctx.generators, strict=True)]
    return base + ctx.weight * disjoint_mean(taus)


METHOD = MergeMethod(
    name="dare-ties",
    summary="θ_V + w·disjoint_mean(DARE_density(τ_i))",
    combine=combine,
    title="DARE-TIES",
    reference="Yu et al. 2024",
    options=frozenset({"weight", "density", "seed"}),
    defaults={"weight": 0.5, "density": 0.5, "seed": 0},
    random=True,
)
