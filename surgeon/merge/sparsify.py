"""The tensor maths the TIES and DARE methods share (Yadav et al. 2023; Yu et al. 2024).

    trim(tau, threshold)          TIES: keep entries with |τ| ≥ threshold, zero the rest
    magnitude_thresholds(...)     the k-th largest |τ_i| of each task vector over a whole tensor,
                                  exact, from tiles streamed twice (peak memory: one tile)
    dare(tau, density, gen)       DARE: drop each entry with probability 1−density, rescale by 1/density
    disjoint_mean(taus)           TIES sign election (sign of the sum) and mean of the agreeing entries
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import torch

Scan = Callable[[Callable[[list[torch.Tensor]], None]], None]


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """τ where |τ| ≥ threshold, else 0. Entries equal to the threshold are all kept."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype))


def dare(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` (uniform draw < density), rescale by 1/density."""
    keep = torch.rand(tau.shape, generator=generator) < density
    return torch.where(keep, tau / density, torch.zeros((), dtype=tau.dtype))


def disjoint_mean(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES merge of task vectors: elect each entry's sign as the sign of Σ_i τ_i, then average the
    non-zero τ_i that carry that sign (0 where none does). For one task vector it returns τ."""
    if len(taus) == 1:
        return taus[0]
    sign = torch.sign(sum(taus))  # type: ignore[arg-type]
    total = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    for t in taus:
        agree = (torch.sign(t) == sign) & (t != 0)
        total += torch.where(agree, t, torch.zeros((), dtype=t.dtype))
        count += agree
    return total / count.clamp(min=1)


def kept_count(density: float, numel: int) -> int:
    """How many entries TIES keeps per task vector: int(density·numel), as mergekit does."""
    return int(density * numel)


def magnitude_thresholds(scan: Scan, k: int, count: int) -> tuple[float, ...]:
    """The exact k-th largest |τ_i| over a whole tensor for each of ``count`` task vectors.

    ``scan(visit)`` must call ``visit([τ_1, …, τ_count])`` on every tile of the tensor (fp32
    tiles of the same rows); it is called twice. Radix selection on the bit patterns of |τ|
    (monotone for non-negative floats): a histogram of the high 16 bits finds the bucket holding
    the k-th largest, a second of the low 16 bits inside that bucket finds the value. Peak memory
    is one tile. ``k == 0`` gives +inf (nothing survives).
    """
    if k <= 0:
        return (float("inf"),) * count
    high = torch.zeros(count, 1 << 16, dtype=torch.int64)

    def count_high(taus: list[torch.Tensor]) -> None:
        for i, t in enumerate(taus):
            high[i] += torch.bincount(_bits(t).bitwise_right_shift(16), minlength=1 << 16)

    scan(count_high)
    buckets, remaining = zip(*(_bucket(high[i], k) for i in range(count)))
    low = torch.zeros(count, 1 << 16, dtype=torch.int64)

    def count_low(taus: list[torch.Tensor]) -> None:
        for i, t in enumerate(taus):
            bits = _bits(t)
            inside = bits[bits.bitwise_right_shift(16) == buckets[i]]
            low[i] += torch.bincount(inside.bitwise_and(0xFFFF), minlength=1 << 16)

    scan(count_low)
    out = []
    for i in range(count):
        lo, _ = _bucket(low[i], remaining[i])
        out.append(struct.unpack("<f", struct.pack("<I", (buckets[i] << 16) | lo))[0])
    return tuple(out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """|t| as int32 bit patterns (fp32), whose integer order is the order of the magnitudes."""
    return t.float().abs().reshape(-1).view(torch.int32)


def _bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The highest bucket b with at least k entries in buckets ≥ b, and k's rank inside b."""
    from_top = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(min(k, int(from_top[-1]))), right=False))
    b = hist.numel() - 1 - idx
    above = int(from_top[idx]) - int(hist[b])
    return b, min(k, int(from_top[-1])) - above
