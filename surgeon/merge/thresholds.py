"""TIES' magnitude thresholds: the exact k-th largest |τ_i| of each task vector over a whole tensor,
from its tiles streamed twice (peak memory: one tile).

    select = MagnitudeThresholds(count=len(taus), k=kept_count(density, numel))
    for tile in tiles: select.count_high(taus_of(tile))
    select.pick()
    for tile in tiles: select.count_low(taus_of(tile))
    select.finish(); select.values      # one threshold per task vector, for ``sparsify.trim``
"""

from __future__ import annotations

import struct
import threading

import torch


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
    survives) without any pass. Tiles may be counted from several threads at once.
    """

    def __init__(self, count: int, k: int) -> None:
        self.count, self.k = count, k
        self.values: tuple[float, ...] | None = (float("inf"),) * count if k <= 0 else None
        self._high = torch.zeros(count, 1 << 16, dtype=torch.int64)
        self._low = torch.zeros(count, 1 << 16, dtype=torch.int64)
        self._buckets: list[int] = []
        self._remaining: list[int] = []
        self._lock = threading.Lock()

    def count_high(self, taus: list[torch.Tensor]) -> None:
        for i, t in enumerate(taus):  # the high 16 bits of |t|: sign dropped, < 1 << 15
            hist = torch.bincount(_signed_bits(t).bitwise_right_shift(16).bitwise_and_(0x7FFF), minlength=1 << 15)
            with self._lock:
                self._high[i, : 1 << 15] += hist

    def pick(self) -> None:
        for i in range(self.count):
            b, r = _bucket(self._high[i], self.k)
            self._buckets.append(b)
            self._remaining.append(r)

    def count_low(self, taus: list[torch.Tensor]) -> None:
        for i, t in enumerate(taus):  # |t|'s offset into the bucket; outside it: bins 0 and 65537
            offset = _signed_bits(t).bitwise_and(0x7FFFFFFF).sub_(self._buckets[i] << 16).clamp_(-1, 1 << 16).add_(1)
            hist = torch.bincount(offset, minlength=(1 << 16) + 2)
            with self._lock:
                self._low[i] += hist[1:-1]

    def finish(self) -> None:
        out = []
        for i in range(self.count):
            lo, _ = _bucket(self._low[i], self._remaining[i])
            out.append(struct.unpack("<f", struct.pack("<I", (self._buckets[i] << 16) | lo))[0])
        self.values = tuple(out)


def _signed_bits(t: torch.Tensor) -> torch.Tensor:
    """t's fp32 bit patterns as int32 (no copy for a contiguous fp32 tile). With the sign bit
    cleared they are |t|'s, whose integer order is the order of the magnitudes."""
    return t.float().contiguous().view(-1).view(torch.int32)


def _bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The highest bucket b with at least k entries in buckets ≥ b, and k's rank inside b."""
    from_top = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(min(k, int(from_top[-1]))), right=False))
    b = hist.numel() - 1 - idx
    above = int(from_top[idx]) - int(hist[b])
    return b, min(k, int(from_top[-1])) - above
