"""Which samples each process sees at each step: one global order, independent of world size.

Every optimiser step consumes one *global batch* of ``batch_size × grad_accum × world_size``
samples, taken in a seeded per-epoch permutation. Process ``r`` runs micro-batch ``j`` on the
slice ``[(r·grad_accum + j)·batch_size, …+batch_size)`` of it. A 1-process run with
``grad_accum = 2`` and a 2-process run with ``grad_accum = 1`` therefore compute on exactly the
same micro-batches, which (with losses normalised by the global token count) makes their updates
equal. The order is a function of (seed, step) alone, so a resumed run continues it exactly.
The last incomplete global batch of each epoch is dropped.

``group_by_length`` (with the samples' token ``lengths``): the permutation is cut into windows of
``GROUP_WINDOW`` global batches and each window sorted by length (longest first), so that a
micro-batch holds samples of similar length and pads little; which samples an epoch sees, and
in which window, is unchanged.

``TokenBudgetOrder`` fills steps by tokens instead of samples: each step takes samples of the
permutation while their tokens fit ``max_tokens × grad_accum × world_size`` (at least one sample
per micro-batch), then deals them into the ``grad_accum × world_size`` micro-batches, largest
first, each within ``max_tokens`` (a packed micro-batch costs the sum of its lengths, a padded
one its longest length times its count). The step's samples and micro-batches depend on that
product only, not on how it splits into processes and accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    lengths: tuple[int, ...] | None = field(default=None, repr=False)  # token count of each sample (group_by_length)
    group_by_length: bool = False

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
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        if not self.group_by_length or self.lengths is None:
            return order
        window, kept = GROUP_WINDOW * self.global_batch, self.steps_per_epoch * self.global_batch
        lengths = torch.tensor(self.lengths)
        parts = [w[torch.argsort(lengths[w], descending=True, stable=True)] for w in order[:kept].split(window)]
        return torch.cat([*parts, order[kept:]])  # the epoch's samples as without grouping; the dropped tail stays last

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


GROUP_WINDOW = 50  # global batches sorted by length together (the transformers Trainer's megabatch multiple)


@dataclass(frozen=True)
class TokenBudgetOrder:
    """Steps filled by tokens (see the module docstring); the same interface as ``SampleOrder``."""

    lengths: tuple[int, ...]
    max_tokens: int
    grad_accum: int
    world_size: int
    seed: int
    packed: bool = True

    def __post_init__(self) -> None:
        longest = max(self.lengths, default=0)
        if longest > self.max_tokens:
            raise ConfigError(
                "max_tokens_per_batch", f"{self.max_tokens} tokens hold no micro-batch of the longest sample ({longest} tokens)",
                f"raise --max-tokens-per-batch to at least {longest}, or lower --max-length",
            )  # fmt: skip
        if self.steps_per_epoch == 0:
            raise ConfigError("max_tokens_per_batch", f"the data has {len(self.lengths)} usable samples, fewer than one per micro-batch", "add data")

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    @property
    def micro(self) -> int:
        return self.grad_accum * self.world_size

    @property
    def global_batch(self) -> int:
        """The samples of an average step (steps vary)."""
        return max(1, round(self.num_samples / max(self.steps_per_epoch, 1)))

    @property
    def steps_per_epoch(self) -> int:
        return len(self._plan(0))

    def _cost(self, lengths: list[int]) -> int:
        return sum(lengths) if self.packed else max(lengths, default=0) * len(lengths)

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        """Every step of an epoch as its ``grad_accum × world_size`` micro-batches (sample indices)."""
        plans = self.__dict__.setdefault("_plans", {})
        if epoch not in plans:
            plans.clear()
            plans[epoch] = self._steps(epoch)
        return plans[epoch]

    def _steps(self, epoch: int) -> list[list[list[int]]]:
        perm = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        budget, k = self.max_tokens * self.micro, self.micro
        steps, i = [], 0
        while len(perm) - i >= k:
            take, total = k, sum(self.lengths[j] for j in perm[i : i + k])
            while i + take < len(perm) and total + self.lengths[perm[i + take]] <= budget:
                total += self.lengths[perm[i + take]]
                take += 1
            while (dealt := self._deal(perm[i : i + take])) is None:  # one sample back to the next step until they fit
                take -= 1
            steps.append(dealt)
            i += take
        return steps

    def _deal(self, chosen: list[int]) -> list[list[int]] | None:
        """``chosen`` dealt into the micro-batches, largest first, each within ``max_tokens`` and
        none empty (in permutation order inside each), or None when they do not fit."""
        k = self.micro
        ranked = sorted(chosen, key=lambda j: (-self.lengths[j], j))
        bins: list[list[int]] = [[j] for j in ranked[:k]]
        for j in ranked[k:]:
            fits = [b for b in bins if self._cost([self.lengths[x] for x in b] + [self.lengths[j]]) <= self.max_tokens]
            if not fits:
                return None
            min(fits, key=lambda b: self._cost([self.lengths[x] for x in b])).append(j)
        position = {j: n for n, j in enumerate(chosen)}
        return [sorted(b, key=position.__getitem__) for b in bins]

    def global_indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        return [i for micro in self._plan(epoch)[within] for i in micro]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        return self._plan(epoch)[within][rank * self.grad_accum : (rank + 1) * self.grad_accum]


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
