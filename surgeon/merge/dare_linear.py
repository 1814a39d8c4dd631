"""``dare-linear`` (Yu et al. 2024): drop each entry of each τ_i with probability 1−density,
rescale the kept ones by 1/density, then θ = θ_V + w·Σ_i DARE(τ_i) (docs/methods.md §2).

Seeded per tensor from ``seed`` and the tensor's LM-relative name, so results are reproducible and
do not depend on tensor order or layout. Defaults (not specified by the paper; surgeon defaults):
w = 0.5, density = 0.5, seed = 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from surgeon.merge.method import MergeMethod, TensorContext
from surgeon.merge.sparsify import dare


def combine(base: torch.Tensor, reasoning: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    total = dare(reasoning[0].sub_(base), ctx.density, ctx.generators[0])
    for r, g in zip(reasoning[1:], ctx.generators[1:], strict=True):
        total += dare(r.sub_(base), ctx.density, g)
    return base + ctx.weight * total


METHOD = MergeMethod(
    name="dare-linear",
    summary="θ_V + w·Σ_i DARE_density(τ_i)",
    combine=combine,
    title="DARE-linear",
    reference="Yu et al. 2024",
    options=frozenset({"weight", "density", "seed"}),
    defaults={"weight": 0.5, "density": 0.5, "seed": 0},
    random=True,
)
