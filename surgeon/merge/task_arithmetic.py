"""``task-arithmetic``: θ = θ_V + w·τ with τ = θ_R − θ_V (docs/methods.md §2).

With several reasoning models the task vectors are summed, θ = θ_V + w·Σ_i τ_i (Ilharco et al.;
not specified by the DRIFT paper). Default w = 0.5 (not specified by the paper; surgeon default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from surgeon.merge.method import MergeMethod, TensorContext


def fused(base: torch.Tensor, reasoning: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    """One model: θ_V + w·(θ_R − θ_V) as one ``lerp`` pass, in place (the blocks are scratch)."""
    return base.lerp_(reasoning[0], ctx.weight)


def combine(base: torch.Tensor, reasoning: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    if len(reasoning) == 1:
        return fused(base, reasoning, ctx)
    tau = reasoning[0].sub_(base)
    for r in reasoning[1:]:
        tau += r.sub_(base)
    return base.add_(tau, alpha=ctx.weight)  # in place: the blocks are scratch


METHOD = MergeMethod(
    name="task-arithmetic",
    summary="θ_V + w·Σ_i τ_i",
    combine=combine,
    title="task-arithmetic",
    reference="Ilharco et al. 2023",
    fused=fused,
    options=frozenset({"weight"}),
    defaults={"weight": 0.5},
)
