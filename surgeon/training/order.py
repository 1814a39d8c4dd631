"""Which samples each process sees at each step: one global order, independent of world size.

Every optimiser step consumes one *global batch* of ``batch_size × grad_accum × world_size``
samples, taken in a seeded per-epoch permutation. Process ``r`` runs micro-batch ``j`` on the
slice ``[(r·grad_accum + j)·batch_size, …+batch_size)`` of it. A 1-process run with
``grad_accum = 2`` and a 2-process run with ``grad_accum = 1`` therefore compute on exactly the
same micro-batches, which (with losses normalised by the global token count) makes their updates
equal. The order is a function of (seed, step) alone, so a resumed run continues it exactly.
The last incomplete global batch of each epoch is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.errors import ConfigError


@dataclass(frozen=True)
class SampleOrder:
    """The global sample order of a run."""

    num_samples: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise ConfigError(
                "batch_size",
                f"the data has {self.num_samples} usable samples, fewer than one global batch of {self.global_batch}",
                "lower --batch-size or --grad-accum, or add data",
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def global_indices(self, step: int) -> list[int]:
        """All sample indices of optimiser step ``step`` (0-based), in micro-batch order."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self._permutation(epoch)[start : start + self.global_batch].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The ``grad_accum`` micro-batches (lists of sample indices) of process ``rank``."""
        indices = self.global_indices(step)
        b = self.batch_size
        return [indices[(rank * self.grad_accum + j) * b : (rank * self.grad_accum + j + 1) * b] for j in range(self.grad_accum)]


class MicroBatches(torch.utils.data.Sampler):
    """A DataLoader's ``batch_sampler``: the micro-batches process ``rank`` runs for optimiser steps
    ``start .. total - 1``, in order (``grad_accum`` of them per step)."""

    def __init__(self, order: SampleOrder, rank: int, start: int, total: int) -> None:
        self.order, self.rank, self.start, self.total = order, rank, start, total

    def __iter__(self):  # type: ignore[no-untyped-def]
        for step in range(self.start, self.total):
            yield from self.order.micro_batches(step, self.rank)

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.order.grad_accum
