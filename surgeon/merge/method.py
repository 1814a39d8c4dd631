"""What a merge method is: a function on fp32 tiles of one tensor, and what it needs.

A method never sees files. The merge engine (``surgeon.merge.engine``) streams each paired
tensor tile by tile (``surgeon.io.streaming``: rows of one tensor, in order) and calls
``combine(base, reasoning, ctx)`` with

    base       θ_V, the VLM tile (fp32)
    reasoning  [θ_R1, θ_R2, …], the reasoning models' tiles (fp32, same shape)
    ctx        a ``TensorContext``: weight, density, per-task-vector magnitude thresholds (TIES)
               and random generators (DARE), prepared per tensor

and writes what it returns. Inputs are scratch: a method may overwrite them. Every method is
elementwise given its context, and DARE's generators are drawn from in row order (torch's CPU
``rand`` gives the same numbers however a draw is split), so results do not depend on how
tensors are cut into tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorContext:
    """Per-tensor inputs of ``combine``.

    ``thresholds[i]``: the magnitude at or above which entries of task vector i survive TIES
    trimming (its k-th largest |τ_i|, k = int(density·numel)); empty unless the method trims.
    ``generators[i]``: task vector i's DARE generator for this tensor, consumed block after block;
    empty unless the method is random.
    """

    relative: str
    weight: float
    density: float
    thresholds: tuple[float, ...] = ()
    generators: tuple[torch.Generator, ...] = ()


Combine = Callable[["torch.Tensor", list["torch.Tensor"], TensorContext], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """One registered merge method.

    ``options``: which of ``weight``, ``density``, ``seed`` it uses (any other given is an error);
    ``defaults``: their values when not given. ``single_model``: exactly one reasoning model.
    ``trims``: needs TIES magnitude thresholds. ``random``: needs DARE generators.
    ``layers_only``: acts on decoder-layer tensors only, in an explicit ``layers`` range.
    ``fused``: an optional single-model form that takes blocks in their stored floating dtype
    (bf16/fp16/fp32, the same for VLM and reasoning model) and returns the result in that dtype,
    computed in fp32 inside one torch kernel (rounded once, exactly as converting, computing in
    fp32 and casting would). It saves the conversions; ``tests/test_merge.py`` checks the
    equivalence on torch's CPU kernels.
    """

    name: str
    summary: str  # the formula, in the notation of ``surgeon.merge.NOTATION``
    combine: Combine
    title: str = ""  # how prose names it ("TIES"); the name when empty
    reference: str = ""  # the paper it comes from
    options: frozenset[str] = frozenset()
    defaults: dict[str, float] = field(default_factory=dict)
    single_model: bool = False
    trims: bool = False
    random: bool = False
    layers_only: bool = False
    fused: Combine | None = None
