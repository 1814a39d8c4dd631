"""``linear``: θ = (1−w)·θ_V + w·θ_R (docs/methods.md §2).

With several reasoning models θ_R is their mean (not specified by the paper; surgeon default).
Default w = 0.5 (not specified by the paper; surgeon default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from surgeon.merge.method import MergeMethod, TensorContext
from surgeon.merge.task_arithmetic import fused  # for one model, (1−w)·θ_V + w·θ_R = θ_V + w·τ


def combine(base: torch.Tensor, reasoning: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    if len(reasoning) == 1:
        return fused(base, reasoning, ctx)
    mean = reasoning[0]
    for r in reasoning[1:]:
        mean += r
    mean /= len(reasoning)
    return base.mul_(1 - ctx.weight).add_(mean, alpha=ctx.weight)  # in place: the blocks are scratch


METHOD = MergeMethod(
    name="linear",
    summary="(1−w)·θ_V + w·θ_R (mean of θ_R for several models)",
    combine=combine,
    fused=fused,
    options=frozenset({"weight"}),
    defaults={"weight": 0.5},
)
