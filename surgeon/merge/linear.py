"""``linear``: θ = (1−w)·θ_V + w·θ_R (METHODS.md §2).

With several reasoning models θ_R is their mean (not specified by the paper; surgeon default).
Default w = 0.5 (not specified by the paper; surgeon default).
"""

from __future__ import annotations

import torch

from surgeon.merge.method import MergeMethod, TensorContext


def combine(base: torch.Tensor, reasoning: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    mean = reasoning[0] if len(reasoning) == 1 else sum(reasoning) / len(reasoning)
    return (1 - ctx.weight) * base + ctx.weight * mean  # type: ignore[operator]


METHOD = MergeMethod(
    name="linear",
    summary="(1−w)·θ_V + w·θ_R (mean of θ_R for several models)",
    combine=combine,
    options=frozenset({"weight"}),
    defaults={"weight": 0.5},
)
