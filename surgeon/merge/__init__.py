"""Merge baselines (docs/methods.md, "Merge baselines"): the methods DRIFT is compared against, one file each.

    from surgeon.merge.engine import MergeConfig, merge_models
    merge_models(MergeConfig(reasoning=("./r1",), vlm="./vlm", output="merged", method="ties"))

Every method acts on the VLM's paired language-model tensors only (``surgeon.anatomy.align``); vision
tower, projector and unpaired tensors are copied byte for byte. A new method is one file with a
``METHOD = MergeMethod(...)`` and one line in ``METHODS`` below; the ``merge`` command's choices
and help, and the model card of a merge, are read from here. Importing the registry needs no torch.
"""

from __future__ import annotations

from surgeon.merge import dare_linear, dare_ties, layer_swap, linear, task_arithmetic, ties
from surgeon.merge.method import MergeMethod

# The notation of every method's ``summary`` (the CLI help and model cards print both).
NOTATION = (
    "θ_V is the VLM's tensor, θ_Ri reasoning model i's, τ_i = θ_Ri − θ_V, w the weight; trim_density "
    "keeps the density fraction of largest |τ_i| per tensor; DARE_density keeps each entry with "
    "probability density and rescales it by 1/density; disjoint_mean elects each entry's sign as the "
    "sign of Σ_i τ_i and averages the τ_i that agree."
)

METHODS: dict[str, MergeMethod] = {
    "linear": linear.METHOD,
    "task-arithmetic": task_arithmetic.METHOD,
    "ties": ties.METHOD,
    "dare-linear": dare_linear.METHOD,
    "dare-ties": dare_ties.METHOD,
    "layer-swap": layer_swap.METHOD,
}
