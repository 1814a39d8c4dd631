"""How sure an accuracy is, and whether two models' accuracies on the same items differ.

    wilson(7, 10)                        # (0.397, 0.892): the 95 % interval of 7 right of 10
    mcnemar(b=1, c=8)                    # 0.0391: exact two-sided p of 1 vs 8 discordant items
    paired_bootstrap(a, b, seed=0)       # (low, high): 95 % interval of mean(b) − mean(a) over the items

Wilson's score interval stays inside [0, 1] and behaves at small n and at 0 % or 100 %, where the
normal approximation does not. McNemar's exact test looks only at the items the two models
disagree on (``b``: the second right, the first wrong; ``c``: the reverse): under "no
difference" each is a fair coin flip, so p = P(Binomial(b+c, ½) as far from the middle as observed),
two-sided. The bootstrap resamples items (the pairs stay together) ``rounds`` times with a fixed
seed, so a report is reproducible. Pure Python: no SciPy needed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``correct`` of ``n`` (``(0, 1)`` for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact at the edges (rounding would leave 1e-17)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant items (1.0 when none)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(first: Sequence[bool], second: Sequence[bool], rounds: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of mean(second) − mean(first) over items resampled in pairs."""
    if len(first) != len(second):
        raise ValueError("paired_bootstrap needs the same items for both models")
    n = len(first)
    if n == 0:
        return 0.0, 0.0
    diffs = [int(b) - int(a) for a, b in zip(first, second)]
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    low = means[int(math.floor((1 - level) / 2 * (rounds - 1)))]
    high = means[int(math.ceil((1 + level) / 2 * (rounds - 1)))]
    return low, high


def compare(first: Sequence[bool], second: Sequence[bool], rounds: int = 2000, seed: int = 0) -> dict:
    """The paired comparison of ``second`` against ``first`` (the same items): the accuracy
    difference, the discordant counts, McNemar's exact p and the bootstrap interval."""
    b = sum(1 for x, y in zip(first, second) if y and not x)
    c = sum(1 for x, y in zip(first, second) if x and not y)
    n = len(first)
    low, high = paired_bootstrap(first, second, rounds, seed)
    return {
        "n": n, "difference": (sum(second) - sum(first)) / n if n else 0.0, "better": b, "worse": c,
        "p_value": mcnemar(b, c), "bootstrap_95": [low, high],
    }  # fmt: skip
