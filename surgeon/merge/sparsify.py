"""The tensor maths the TIES and DARE methods share (Yadav et al. 2023; Yu et al. 2024).

    trim(tau, threshold)          TIES: keep entries with |τ| ≥ threshold, zero the rest
    dare(tau, density, gen)       DARE: drop each entry with probability 1−density, rescale by 1/density
    disjoint_mean(taus)           TIES sign election (sign of the sum) and mean of the agreeing entries

TIES' thresholds are ``surgeon.merge.thresholds``. torch is imported when a function runs, so the
registry (``surgeon.merge.METHODS``) loads without it (the CLI and model cards read its names).
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """τ where |τ| ≥ threshold, else 0. Entries equal to the threshold are all kept.

    For fp32 τ this is one fused kernel, ``hardshrink`` (which keeps |τ| > λ) with λ the largest
    float32 below the threshold: for float32 values the two conditions are the same."""
    import torch

    if tau.dtype != torch.float32 or math.isnan(threshold):
        return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype))
    return torch.nn.functional.hardshrink(tau, _float32_below(threshold))


def _float32_below(x: float) -> float:
    """The largest float32 strictly below ``x`` (x ≥ 0), or 0.0 for x = 0 (nothing is below |τ| ≥ 0)."""
    if x <= 0:
        return 0.0
    nearest = struct.unpack("<f", struct.pack("<f", min(x, 3.4028234663852886e38)))[0] if math.isfinite(x) else math.inf
    if nearest < x:
        return nearest
    bits = struct.unpack("<I", struct.pack("<f", nearest))[0]
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]


def dare(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` (uniform draw < density), rescale by 1/density."""
    import torch

    keep = torch.rand(tau.shape, generator=generator) < density
    return torch.where(keep, tau / density, torch.zeros((), dtype=tau.dtype))


def disjoint_mean(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES merge of task vectors: elect each entry's sign as the sign of Σ_i τ_i, then average the
    non-zero τ_i that carry that sign (0 where none does). For one task vector it returns τ."""
    if len(taus) == 1:
        return taus[0]
    import torch

    sign = torch.sign(sum(taus))  # type: ignore[arg-type]
    total = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    for t in taus:
        agree = (torch.sign(t) == sign) & (t != 0)
        total += torch.where(agree, t, torch.zeros((), dtype=t.dtype))
        count += agree
    return total / count.clamp(min=1)
