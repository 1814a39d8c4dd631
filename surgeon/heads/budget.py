"""Which KV heads Image-LoRA adapts, given head scores (docs/methods.md §4).

    budgets, selected = select_heads(scores, budget=28, tau=0.5)    # scores: [layers][kv_heads]
    select_heads(scores, per_layer=1)                                 # one head in every layer

Under a global budget K: layer mass M_l = Σ_h max(score, 0); k_l = round(K·M_l^τ/Σ M^τ) capped at
H_kv; then Σ k_l = K is restored by adding one head at a time to the layers in order of
decreasing mass (skipping full ones), or removing one at a time in order of increasing mass; if
every mass is zero the budget follows capacity. Each layer keeps its k_l highest-scoring heads.
τ = 0 spreads the budget evenly, τ = 1 follows the mass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from surgeon.errors import ConfigError


def default_budget(num_layers: int, num_kv_heads: int) -> int:
    """A quarter of all KV heads (the reference's default), rounded half up, at least 1."""
    return max(1, math.floor(num_layers * num_kv_heads / 4 + 0.5))


def allocate_budget(scores: Sequence[Sequence[float]], budget: int, tau: float = 0.5) -> list[int]:
    """Heads per layer, summing to ``budget`` and at most H_kv each (docs/methods.md §4).

    k_l = round(K·M_l^τ/Σ M^τ) (half up; the rounding rule is not specified by the paper) with
    M_l = Σ_h max(score, 0) and 0^0 = 1, so τ = 0 gives every layer the same share.
    """
    layers, capacity = len(scores), len(scores[0])
    if not 1 <= budget <= layers * capacity:
        raise ConfigError("budget", f"must lie in [1, {layers * capacity}] (all KV heads), got {budget}")
    if not (tau >= 0 and math.isfinite(tau)):
        raise ConfigError("tau", f"must be a finite number ≥ 0, got {tau}")
    mass = [sum(max(float(s), 0.0) for s in row) for row in scores]
    weights = [m**tau for m in mass] if any(m > 0 for m in mass) else [float(capacity)] * layers
    total = sum(weights)
    k = [min(capacity, math.floor(budget * w / total + 0.5)) for w in weights]
    by_mass = sorted(range(layers), key=lambda i: (-mass[i], i))  # highest mass first, then lower layer
    while sum(k) < budget:
        for i in by_mass:
            if sum(k) < budget and k[i] < capacity:
                k[i] += 1
    while sum(k) > budget:
        for i in reversed(by_mass):
            if sum(k) > budget and k[i] > 0:
                k[i] -= 1
    return k


def top_heads(row: Sequence[float], k: int) -> list[int]:
    """The ``k`` highest-scoring heads of one layer (ties: lower index), in ascending order."""
    return sorted(sorted(range(len(row)), key=lambda h: (-float(row[h]), h))[:k])


def select_heads(
    scores: Sequence[Sequence[float]], budget: int | None = None, tau: float = 0.5, per_layer: int | None = None
) -> tuple[list[int], list[list[int]]]:
    """``(per-layer budgets, selected heads)`` under a global ``budget`` (default: a quarter of all
    KV heads) with ``tau``, or a fixed ``per_layer`` count."""
    layers, capacity = len(scores), len(scores[0])
    if per_layer is not None:
        if per_layer > capacity:
            raise ConfigError("per_layer", f"{per_layer} exceeds the model's {capacity} KV heads per layer")
        budgets = [per_layer] * layers
    else:
        budgets = allocate_budget(scores, budget if budget is not None else default_budget(layers, capacity), tau)
    return budgets, [top_heads(row, k) for row, k in zip(scores, budgets)]
