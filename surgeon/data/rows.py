"""Where samples come from: a data file or dataset, read one row at a time.

    rows = open_rows("data.jsonl")            # or data.parquet, a save_to_disk folder, org/dataset
    len(rows), rows.record(i), rows.line(i)   # one parsed row; its 1-based line (or row) number

- ``.jsonl`` (or ``.json`` holding one JSON array): read by surgeon itself, without the whole file in
  memory: one pass records where each line starts (8 bytes a line), then a row is read and parsed
  when asked for. Lines over ``MAX_LINE_BYTES`` are bad lines; a JSON array is parsed whole (at most
  ``MAX_ARRAY_BYTES``).
- ``.parquet`` files, a folder written by ``datasets.Dataset.save_to_disk``, or a Hub dataset id
  (``org/name``, ``org/name@revision``; the ``train`` split, or ``--data org/name:split``): read
  through the ``datasets`` library, whose Arrow files are memory-mapped, so a row costs its own
  bytes only. Hub datasets honour ``HF_HUB_OFFLINE`` and the Hugging Face cache. Image columns (the
  ``datasets`` ``Image`` feature) come as ``{"bytes": …, "path": …}`` without decoding.

Image paths in a row are relative to the data file's folder (``rows.base``); for a Hub dataset,
to its snapshot in the cache.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any

from surgeon.errors import DataError
from surgeon.hub.repo_ids import DATASET

MAX_LINE_BYTES = 8 * 2**20  # a JSONL line (one sample) longer than this is a bad line (surgeon's limit)
MAX_ARRAY_BYTES = 2**30  # a JSON-array file is parsed whole: larger ones must be JSONL


class TooLongLine(Exception):
    """A line over the limit; ``size`` is its length in bytes."""

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit
        super().__init__(f"{size / 2**20:.1f} MB, over the limit of {limit / 2**20:.0f} MB for one sample")


class MalformedLine(Exception):
    """A line that is not JSON; the message is the decoder's."""


class JsonlRows:
    """A JSONL file (or a JSON array file) as rows; see the module docstring."""

    def __init__(self, path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.path = Path(path)
        self.source = str(path)
        self.base = self.path.parent.resolve()
        self.max_line_bytes = max_line_bytes
        self._items: list[Any] | None = None
        self._starts = array("q")  # byte offset of each non-empty line (8 bytes a line, shared by forked workers)
        self._lines = array("q")  # its 1-based line number
        with open(self.path, "rb") as f:
            head = f.read(4096)
        if head.decode("utf-8-sig", errors="ignore").lstrip().startswith("["):
            self._load_array()
        else:
            self._index()

    def _load_array(self) -> None:
        size = self.path.stat().st_size
        if size > MAX_ARRAY_BYTES:
            raise DataError(self.source, f"is a {size / 2**30:.1f} GiB JSON array", "write it as JSONL, one sample a line")
        try:
            items = json.loads(self.path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise DataError(self.source, "is not UTF-8 text", "give a .jsonl file with one JSON object a line") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.source}:{exc.lineno}", f"malformed JSON array ({exc.msg})", "fix the file") from None
        if not isinstance(items, list):
            raise DataError(self.source, "is a JSON value, not an array of samples", "write one sample a line (JSONL)")
        self._items = items
        self._lines = array("q", range(1, len(items) + 1))

    def _index(self) -> None:
        """One pass over the file: where each non-empty line starts (never a whole line in memory)."""
        with open(self.path, "rb") as f:
            number, pos = 0, 0
            while chunk := f.readline(self.max_line_bytes + 1):
                start, number = pos, number + 1
                pos += len(chunk)
                blank = not chunk.strip(b" \t\r\n\xef\xbb\xbf")
                while not chunk.endswith(b"\n") and (chunk := f.readline(1 << 20)):  # the rest of a long line
                    pos += len(chunk)
                    blank = False
                if not blank:
                    self._starts.append(start)
                    self._lines.append(number)

    def __len__(self) -> int:
        return len(self._lines)

    def line(self, i: int) -> int:
        return self._lines[i]

    def fingerprint(self) -> str:
        """The file's content hash (16 hex digits)."""
        from surgeon.io.provenance import file_hash

        return file_hash(self.path)

    def record(self, i: int) -> Any:
        """The parsed row; raises TooLongLine or MalformedLine for a bad line."""
        if self._items is not None:
            return self._items[i]
        with open(self.path, "rb") as f:
            f.seek(self._starts[i])
            raw = f.readline(self.max_line_bytes + 1)
            if len(raw) > self.max_line_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
                    size += len(more)
                raise TooLongLine(size + len(more), self.max_line_bytes)
        if self._starts[i] == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a byte-order mark some editors write is not data
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(self.source, "is not UTF-8 text", "give a .jsonl file with one JSON object a line") from None
        if not text.strip():
            raise MalformedLine("empty line")
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise MalformedLine(exc.msg) from None


class DatasetRows:
    """A ``datasets.Dataset`` (parquet, save_to_disk, Hub) as rows, images undecoded."""

    def __init__(self, dataset: Any, source: str, base: Path, hub: dict[str, str] | None = None) -> None:
        from datasets import Image

        self.hub = hub  # a Hub dataset's {"revision", "commit" when known}; None for local data

        for name, feature in dataset.features.items():  # image columns: bytes/path dicts, not PIL images
            if isinstance(feature, Image):
                dataset = dataset.cast_column(name, Image(decode=False))
            elif getattr(feature, "feature", None) is not None and isinstance(feature.feature, Image):
                from datasets import Sequence

                dataset = dataset.cast_column(name, Sequence(Image(decode=False)))
            elif isinstance(feature, list) and feature and isinstance(feature[0], Image):
                dataset = dataset.cast_column(name, [Image(decode=False)])
        self.dataset = dataset
        self.source = source
        self.base = base

    def __len__(self) -> int:
        return len(self.dataset)

    def line(self, i: int) -> int:
        return i + 1

    def record(self, i: int) -> Any:
        return self.dataset[i]

    def fingerprint(self) -> str:
        """A parquet file's content hash; the ``datasets`` fingerprint of a folder or Hub dataset."""
        path = Path(self.source)
        if path.is_file():
            from surgeon.io.provenance import file_hash

            return file_hash(path)
        return str(getattr(self.dataset, "_fingerprint", None) or self.source)[:16]


def looks_like_hub_dataset(text: str) -> bool:
    """``org/name``, ``org/name@revision`` or ``org/name:split`` (not a local file name)."""
    return bool(DATASET.match(text)) and not text.endswith((".jsonl", ".json", ".parquet"))


def open_rows(source: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> JsonlRows | DatasetRows:
    """The rows of a data file, a ``save_to_disk`` folder, or a Hub dataset (see the module docstring)."""
    from surgeon.io.paths import check_file

    path = Path(source)
    text = str(source)
    check_file(path, "data file")
    if path.is_file():
        if path.suffix == ".parquet":
            return _parquet(path)
        return JsonlRows(path, max_line_bytes)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _saved(path)
        parquet = sorted(path.glob("*.parquet"))
        if parquet:
            return _parquet(path, parquet)
        raise DataError(text, "is a folder that holds no dataset", "give a .jsonl/.parquet file, a save_to_disk folder or a Hub dataset id")
    if looks_like_hub_dataset(text):
        return _hub(text)
    raise DataError(text, "no such file", "give a .jsonl, .json or .parquet file, a save_to_disk folder, or a Hub dataset id (org/name)")


def _parquet(path: Path, files: list[Path] | None = None) -> DatasetRows:
    from datasets import load_dataset

    data_files = [str(f) for f in (files or [path])]
    try:
        dataset = load_dataset("parquet", data_files=data_files, split="train")
    except Exception as exc:  # noqa: BLE001 - the library's own error, one line
        raise DataError(str(path), f"cannot be read as parquet ({' '.join(str(exc).split())[:200]})") from None
    return DatasetRows(dataset, str(path), (path if path.is_dir() else path.parent).resolve())


def _saved(path: Path) -> DatasetRows:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(str(path), f"cannot be read as a saved dataset ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise DataError(str(path), f"holds the splits {', '.join(dataset)} but no 'train'", "save the split to train on")
        dataset = dataset["train"]
    return DatasetRows(dataset, str(path), path.resolve())


def _hub(spec: str) -> DatasetRows:
    from datasets import load_dataset

    repo, _, split = spec.partition(":")
    repo, _, revision = repo.partition("@")
    try:
        dataset = load_dataset(repo, split=split or "train", revision=revision or None)
    except Exception as exc:  # noqa: BLE001 - offline, not found, no such split: the library says which
        raise DataError(spec, f"cannot be loaded ({' '.join(str(exc).split())[:200]})", "check the id, the split and HF_HUB_OFFLINE") from None
    base = Path(dataset.cache_files[0]["filename"]).parent if dataset.cache_files else Path.cwd()
    commit = _hub_commit(repo, revision, dataset)
    return DatasetRows(dataset, spec, base, {"revision": revision or "main", **({"commit": commit} if commit else {})})


def _hub_commit(repo: str, revision: str, dataset: Any) -> str | None:
    """The commit a Hub dataset was read at: ``datasets`` caches a Hub repo's data under its commit
    hash; otherwise the Hub is asked (unless offline); None when neither can say."""
    import re

    for entry in dataset.cache_files or []:
        for part in reversed(Path(entry["filename"]).parts):
            if re.fullmatch(r"[0-9a-f]{40}", part):
                return part
    from surgeon.hub.download import dataset_commit

    return dataset_commit(repo, revision or None)
