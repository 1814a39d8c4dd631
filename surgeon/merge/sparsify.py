"""The tensor maths the TIES and DARE methods share (Yadav et al. 2023; Yu et al. 2024).

    trim(tau, threshold)          TIES: keep entries with |τ| ≥ threshold, zero the rest
    MagnitudeThresholds           the k-th largest |τ_i| of each task vector over a whole tensor,
                                  exact, from tiles streamed twice (peak memory: one tile)
    dare(tau, density, gen)       DARE: drop each entry with probability 1−density, rescale by 1/density
    disjoint_mean(taus)           TIES sign election (sign of the sum) and mean of the agreeing entries
"""

from __future__ import annotations

import struct

import torch


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


class MagnitudeThresholds:
    """The exact k-th largest |τ_i| over a whole tensor for each of ``count`` task vectors, from
    two passes over its tiles (peak memory: one tile).

    Radix selection on the bit patterns of |τ| (monotone for non-negative floats): pass 1
    (``count_high`` on every tile, then ``pick``) histograms the high 16 bits and finds the bucket
    holding the k-th largest; pass 2 (``count_low``, then ``finish``) histograms the low 16 bits
    inside that bucket and finds the value, in ``values``. ``k == 0`` gives +inf (nothing
    survives) without any pass.
    """

    def __init__(self, count: int, k: int) -> None:
        self.count, self.k = count, k
        self.values: tuple[float, ...] | None = (float("inf"),) * count if k <= 0 else None
        self._high = torch.zeros(count, 1 << 16, dtype=torch.int64)
        self._low = torch.zeros(count, 1 << 16, dtype=torch.int64)
        self._buckets: list[int] = []
        self._remaining: list[int] = []

    def count_high(self, taus: list[torch.Tensor]) -> None:
        for i, t in enumerate(taus):
            self._high[i] += torch.bincount(_bits(t).bitwise_right_shift(16), minlength=1 << 16)

    def pick(self) -> None:
        for i in range(self.count):
            b, r = _bucket(self._high[i], self.k)
            self._buckets.append(b)
            self._remaining.append(r)

    def count_low(self, taus: list[torch.Tensor]) -> None:
        for i, t in enumerate(taus):
            bits = _bits(t)
            inside = bits[bits.bitwise_right_shift(16) == self._buckets[i]]
            self._low[i] += torch.bincount(inside.bitwise_and(0xFFFF), minlength=1 << 16)

    def finish(self) -> None:
        out = []
        for i in range(self.count):
            lo, _ = _bucket(self._low[i], self._remaining[i])
            out.append(struct.unpack("<f", struct.pack("<I", (self._buckets[i] << 16) | lo))[0])
        self.values = tuple(out)


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
