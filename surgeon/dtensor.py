"""Tensors sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): local views, row ranges,
and sums over ranks from local partial sums.

FSDP2 turns each parameter (and its gradient and optimiser state) into a DTensor sharded on
dim 0 over the data-parallel ranks: rank r holds rows ``[r·c, min((r+1)·c, n))`` with
``c = ceil(n / world)`` (the last ranks may hold fewer rows, or none). Code that needs a
whole-tensor quantity (a norm, a dot product) computes it on the local rows and adds the partial
sums over ranks, several quantities in one all-reduce::

    sums = torch.stack([local(g).float().pow(2).sum() for g in grads])
    total = global_sums(sums, sharded=[is_sharded(g) for g in grads])   # one collective

Plain (replicated) tensors pass through every function here unchanged, so the same code runs
on one process, under DDP and under FSDP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor whose rows are split over ranks (not replicated)."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its local rows), or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def row_range(t: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)``: the rows of dim 0 that this rank holds (all rows for a plain tensor)."""
    if not is_sharded(t):
        return 0, (t.shape[0] if t.dim() else 0)
    mesh = t.device_mesh  # type: ignore[attr-defined]
    if mesh.ndim != 1 or tuple(p.dim for p in t.placements if p.is_shard()) != (0,):  # type: ignore[attr-defined]
        raise ValueError(f"only dim-0 sharding on a 1-D mesh is supported, got {t.placements}")  # type: ignore[attr-defined]
    n, world, rank = t.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    if stop - start != local(t).shape[0]:
        raise ValueError(f"unexpected shard layout: rows {start}..{stop} but a local shape of {tuple(local(t).shape)}")
    return start, stop


def _group(tensors: Sequence[torch.Tensor]) -> object | None:
    for t in tensors:
        if is_sharded(t):
            return t.device_mesh.get_group()  # type: ignore[attr-defined]
    return None


def global_sums(partial: torch.Tensor, sharded: Sequence[bool], like: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Whole-tensor sums from per-rank partial sums: entry i of ``partial`` (any trailing shape)
    is summed over ranks where ``sharded[i]``, and kept as is where the tensor is replicated
    (only rank 0 contributes it, so no value is counted twice). One all-reduce for all entries;
    none when nothing is sharded. ``like``: tensors whose mesh gives the process group."""
    if not any(sharded):
        return partial
    import torch.distributed as dist

    group = _group(like)
    rank = dist.get_rank(group)
    if rank != 0 and not all(sharded):
        keep = torch.tensor(sharded, dtype=torch.bool, device=partial.device)
        partial = partial * keep.view(-1, *([1] * (partial.dim() - 1))).to(partial.dtype)
    partial = partial.clone()
    dist.all_reduce(partial, group=group)  # type: ignore[arg-type]
    return partial


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖t‖² of every tensor over all ranks, fp32, as one vector (one all-reduce at most)."""
    if not tensors:
        return torch.zeros(0)
    device = local(tensors[0]).device
    partial = torch.stack([local(t).detach().float().pow(2).sum().to(device) for t in tensors])
    return global_sums(partial, [is_sharded(t) for t in tensors], tensors)


def global_norm(tensors: Sequence[torch.Tensor | None]) -> float:
    """The L2 norm of all tensors together, over all ranks (fp32, one host sync)."""
    present = [t for t in tensors if t is not None]
    return float(squared_norms(present).sum().sqrt()) if present else 0.0
