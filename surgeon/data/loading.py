"""Encoded samples for a DataLoader: lazily from a scanned source (``LazyDataset``, what training
uses), eagerly from a list (``EncodedDataset``), or as an iterator (``encode_samples``).

    encoder = SampleEncoder.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", max_length=4096)
    dataset = LazyDataset(scan_samples("data.jsonl"), encoder)
    loader = DataLoader(dataset, batch_size=4, collate_fn=encoder.collate, num_workers=4)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from surgeon.data.encoding import IGNORE_INDEX, Encoded, Progress, SampleEncoder, TooLong
from surgeon.data.samples import SKIP_HINT, BadSample, DataStats, Sample
from surgeon.data.scan import ScannedData
from surgeon.errors import DataError


def encode_samples(
    samples: Sequence[Sample],
    encoder: SampleEncoder,
    stats: DataStats | None = None,
    skip_bad: bool = False,
    progress: Progress | None = None,
) -> Iterator[tuple[int, Encoded]]:
    """Yield ``(index into samples, Encoded)`` for every usable sample, updating ``stats``.

    Samples that do not fit ``max_length`` are skipped and counted; a bad sample raises DataError
    naming its line unless ``skip_bad``. Raises DataError at the end if no sample was usable.
    """
    stats = stats if stats is not None else DataStats()
    kept = 0
    for i, sample in enumerate(samples):
        try:
            enc = encoder.encode(sample)
        except TooLong as skip:
            stats.skip(f"{skip.reason} ({encoder.max_length})", sample.line)
            continue
        except BadSample as bad:
            if not skip_bad:
                raise DataError(sample.where, str(bad), SKIP_HINT) from None
            stats.skip(bad.reason, sample.line)
            continue
        finally:
            if progress:
                progress("encoding", i + 1, len(samples))
        kept += 1
        stats.used += 1
        stats.images += len(sample.images)
        stats.tokens += len(enc)
        stats.supervised_tokens += int((enc.labels != IGNORE_INDEX).sum())
        stats.perception_tokens += int(enc.perception_mask.sum())
        yield i, enc
    if not kept:
        where = samples[0].source if samples else "data"
        problem = f"all {len(samples)} samples were skipped: {stats.describe_skipped()}"
        raise DataError(where, problem, "raise max_length or fix the data")


class EncodedDataset(torch.utils.data.Dataset):
    """The usable samples, encoded on access (``dataset[i] -> Encoded``).

    Construction encodes every sample once to find the usable ones and fill ``stats``; with
    ``cache=False`` (default) nothing is kept and ``__getitem__`` encodes again (memory stays at
    one batch of images); ``cache=True`` keeps every Encoded in memory (small datasets only:
    pixel tensors of every image). ``lengths[i]`` is the token count of ``dataset[i]``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        encoder: SampleEncoder,
        stats: DataStats | None = None,
        skip_bad: bool = False,
        cache: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.encoder = encoder
        self.stats = stats if stats is not None else DataStats()
        self.samples: list[Sample] = []
        self.lengths: list[int] = []
        self._cache: list[Encoded] = []
        for i, enc in encode_samples(samples, encoder, self.stats, skip_bad, progress):
            self.samples.append(samples[i])
            self.lengths.append(len(enc))
            if cache:
                self._cache.append(enc)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Encoded:
        return self._cache[i] if self._cache else self.encoder.encode(self.samples[i])


class LazyDataset(torch.utils.data.Dataset):
    """The usable rows of a scanned data source (``surgeon.data.samples.scan_samples``), parsed and encoded
    when asked for (``dataset[i] -> Encoded``), so memory does not grow with the dataset and a
    DataLoader's workers do the work. Nothing is cached.

    A sample that encoding cannot use becomes a hollow stand-in (one padding token, nothing
    supervised, no image; ``Encoded.skipped`` says why) so that batches keep their composition on
    every process: a sample whose image tokens would be cut by ``max_length`` or that keeps no
    supervised token, and, with ``skip_bad``, one whose image cannot be read or that the processor
    refuses (without ``skip_bad`` these raise DataError naming the line, when reached). A hollow
    sample trains nothing: losses are normalised by the supervised tokens of the whole step."""

    def __init__(self, scanned: ScannedData, encoder: SampleEncoder, skip_bad: bool = False) -> None:
        self.scanned = scanned
        self.encoder = encoder
        self.skip_bad = skip_bad
        self.stats = scanned.stats

    def __len__(self) -> int:
        return len(self.scanned)

    def __getitem__(self, i: int) -> Encoded:
        sample = self.scanned.sample(i)
        try:
            return self.encoder.encode(sample)
        except TooLong as skip:
            return self.hollow(sample.line, f"{skip.reason} ({self.encoder.max_length})")
        except BadSample as bad:
            if not self.skip_bad:
                raise DataError(sample.where, str(bad), SKIP_HINT) from None
            return self.hollow(sample.line, bad.reason)

    def hollow(self, line: int, reason: str) -> Encoded:
        ids = torch.tensor([self.encoder.pad_token_id])
        tokens = {
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX),
            "perception_mask": torch.zeros_like(ids, dtype=torch.bool),
        }  # fmt: skip
        return Encoded(tokens, {}, line, skipped=reason)


def token_lengths(dataset: torch.utils.data.Dataset, indices: Sequence[int], num_workers: int = 0) -> list[int]:
    """The token count of each sample at ``indices`` (a hollow stand-in counts its one token),
    encoded in ``num_workers`` DataLoader processes (images decoded, then dropped)."""
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = torch.utils.data.DataLoader(subset, batch_size=None, collate_fn=len, num_workers=num_workers)
    return [int(n) for n in loader]


class CountingCollate:
    """``collate_fn`` for a DataLoader over a LazyDataset: ``(batch, reasons of hollow samples)``;
    ``packed``: the batch as one packed row (``surgeon.data.packing``) instead of padded rows."""

    def __init__(self, encoder: SampleEncoder, packed: bool = False) -> None:
        self.encoder = encoder
        self.packed = packed

    def __call__(self, items: Sequence[Encoded]) -> tuple[dict[str, torch.Tensor], list[str]]:
        from surgeon.data.packing import pack

        batch = pack(items, self.encoder.pad_token_id) if self.packed else self.encoder.collate(items)
        return batch, [e.skipped for e in items if e.skipped]
