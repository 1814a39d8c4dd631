"""``layer-swap``: replace the VLM's decoder layers in the ``layers`` range by the reasoning
model's (docs/methods.md §2): θ = θ_R for every selected tensor of those layers; embeddings, final
norm, head and all other layers stay the VLM's. The range must be given (no default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from surgeon.merge.method import MergeMethod, TensorContext


def combine(base: torch.Tensor, reasoning: list[torch.Tensor], ctx: TensorContext) -> torch.Tensor:
    return reasoning[0]


METHOD = MergeMethod(
    name="layer-swap",
    summary="θ_R in the given decoder layers, θ_V elsewhere",
    combine=combine,
    single_model=True,
    layers_only=True,
)
