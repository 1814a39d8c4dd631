"""Merge baselines (METHODS.md §2): the methods DRIFT is compared against, one file each.

    from surgeon.merge.engine import MergeConfig, merge_models
    merge_models(MergeConfig(reasoning=("./r1",), vlm="./vlm", output="merged", method="ties"))

Every method acts on the VLM's paired language-model tensors only (``surgeon.anatomy.align``); vision
tower, projector and unpaired tensors are copied byte for byte. A new method is one file with a
``METHOD = MergeMethod(...)`` and one line in ``METHODS`` below.
"""

from __future__ import annotations

from surgeon.merge import dare_linear, dare_ties, layer_swap, linear, task_arithmetic, ties
from surgeon.merge.method import MergeMethod

METHODS: dict[str, MergeMethod] = {
    "linear": linear.METHOD,
    "task-arithmetic": task_arithmetic.METHOD,
    "ties": ties.METHOD,
    "dare-linear": dare_linear.METHOD,
    "dare-ties": dare_ties.METHOD,
    "layer-swap": layer_swap.METHOD,
}
