"""Whole data sources: one validation pass that reads no pixel (``scan_samples``), then samples
parsed again when they are needed.

    scanned = scan_samples("data.jsonl")        # or parquet, a save_to_disk folder, a Hub dataset id
    len(scanned), scanned.stats, scanned.sample(0)
    samples = load_samples("data.jsonl")        # list[Sample], for small datasets
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.data.formats import compile_pattern, parse_record
from surgeon.data.samples import SKIP_HINT, BadSample, DataStats, Sample
from surgeon.errors import DataError

def load_samples(
    path: str | Path,
    perception_regex: str | None = None,
    skip_bad: bool = False,
    max_samples: int | None = None,
    stats: DataStats | None = None,
) -> list[Sample]:
    """Read a chat dataset (any source ``surgeon.data.rows.open_rows`` reads) into normalised samples.

    Raises DataError for a source that cannot be read or holds no usable sample, and for the first
    bad line unless ``skip_bad``. ``max_samples`` stops after that many good samples. ``stats``,
    when given, receives the counts (``read``, ``skipped``). For large datasets prefer
    ``scan_samples``, which keeps row numbers instead of samples.
    """
    scanned = scan_samples(path, perception_regex, skip_bad, max_samples, stats)
    return [scanned.sample(i) for i in range(len(scanned))]


@dataclass
class ScannedData:
    """The usable rows of a data source, found by ``scan_samples`` without reading any pixel.

    ``rows``: the source (``surgeon.data.rows``); ``good``: indices of its usable rows; ``sample(i)``
    parses the i-th usable row again (memory stays one sample whatever the dataset's size).
    ``perception``: whether any assistant turn marks a perception span; ``with_images``: the
    positions (into the usable rows) of samples with images."""

    rows: Any
    good: Any  # array("q") of row indices
    stats: DataStats
    pattern: re.Pattern | None
    perception: bool = False
    with_images: Any = field(default_factory=lambda: array("q"))
    supervised: bool = True  # every row needs an assistant turn (False: evaluation rows may carry an ``answer`` instead)

    @property
    def images(self) -> int:
        return len(self.with_images)

    def __len__(self) -> int:
        return len(self.good)

    def sample(self, i: int) -> Sample:
        j = self.good[i]
        return parse_record(self.rows.record(j), self.rows.base, self.pattern, self.rows.line(j), self.rows.source, self.supervised)

    def samples(self, order: Sequence[int] | None = None) -> SampleView:
        """The usable samples (or those at ``order``) as a sequence parsed on access."""
        return SampleView(self, range(len(self)) if order is None else order)


class SampleView(Sequence):
    """Samples of a ``ScannedData``, parsed when indexed: a dataset-sized list of samples never exists."""

    def __init__(self, scanned: ScannedData, order: Sequence[int]) -> None:
        self.scanned, self.order = scanned, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        return self.scanned.sample(self.order[i])


def scan_samples(
    path: str | Path,
    perception_regex: str | None = None,
    skip_bad: bool = False,
    max_samples: int | None = None,
    stats: DataStats | None = None,
    supervised: bool = True,
) -> ScannedData:
    """One validation pass over a data source: every row is parsed and checked (format, roles,
    image files exist, image counts, perception tags) but no image is opened. ``supervised=False``
    takes rows without an assistant turn too (evaluation sets). Raises DataError at
    the first bad row, naming its line, unless ``skip_bad`` (then it is counted in ``stats``)."""
    from surgeon.data.rows import MalformedLine, TooLongLine, open_rows

    rows = open_rows(path)
    pattern = compile_pattern(perception_regex)
    stats = stats if stats is not None else DataStats()
    scanned = ScannedData(rows, array("q"), stats, pattern, supervised=supervised)
    for j in range(len(rows)):
        if max_samples is not None and len(scanned.good) >= max_samples:
            break
        stats.read += 1
        line = rows.line(j)
        try:
            try:
                record = rows.record(j)
            except TooLongLine as exc:
                raise BadSample("line too long", str(exc)) from None
            except MalformedLine as exc:
                raise BadSample("malformed JSON", str(exc)) from None
            sample = parse_record(record, rows.base, pattern, line, rows.source, supervised)
        except BadSample as bad:
            if not skip_bad:
                raise DataError(f"{rows.source}:{line}", str(bad), SKIP_HINT) from None
            stats.skip(bad.reason, line)
            continue
        if sample.images:
            scanned.with_images.append(len(scanned.good))
        scanned.good.append(j)
        scanned.perception = scanned.perception or any(t.perception for t in sample.turns)
    if not scanned.good:
        detail = "holds no samples"
        if stats.read:
            detail = f"all {stats.read} samples are bad: {stats.describe_skipped()}"
        hint = "fix the lines named (`surgeon diagnose --help` describes the accepted formats)"
        raise DataError(str(path), detail, hint)
    return scanned
