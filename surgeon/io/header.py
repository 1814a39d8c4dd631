"""The safetensors header, read and built without torch.

A safetensors file is ``u64 header_len | JSON header | data``; the header maps each tensor name to
its dtype, shape and ``data_offsets`` into the data section. Reading the header gives every name,
shape and dtype without touching data; ``surgeon.io.safetensors`` reads the tensors themselves.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024


class FormatError(ValueError):
    """The bytes of a file are not a valid safetensors file (message says how)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: name, dtype code (``"BF16"``), shape, file and byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int  # absolute byte offset of the data in ``file``
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


def raw_header(path: str | Path) -> bytes:
    """The JSON header bytes of a safetensors file, unparsed (what push scans for credentials).
    Raises FormatError for a file too short or whose declared header length cannot be right."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"is {size} bytes long, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or n > size - 8:
            raise FormatError(f"has a corrupt header (declared length {n} for a {size}-byte file)")
        return f.read(n)


def read_header(path: Path, file_name: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (tensors in data order, ``__metadata__``).

    Raises FormatError for a corrupt header, unknown dtype, inconsistent offsets, or a file whose
    data section is shorter than the header promises (a truncated download or copy).
    """
    return parse_header(raw_header(path), Path(path).stat().st_size, file_name or Path(path).name)


def parse_header(raw: bytes, size: int | None, file_name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``read_header`` for header bytes already in hand (``raw``, without the 8-byte length) of a
    file of ``size`` bytes named ``file_name``: the same checks, the same result (``size`` None:
    unknown, so the data section's length is not checked)."""
    n = len(raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"has a corrupt header (not JSON: {e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(header, dict):
        raise FormatError("has a corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    data_len = size - base if size is not None else None
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"has a corrupt header entry for {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise FormatError(f"stores {name!r} as {dtype}, a dtype surgeon does not handle")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not (0 <= b <= e) or e - b != expected:
            raise FormatError(f"has inconsistent offsets for {name!r} ({b}..{e} for {expected} bytes)")
        tensors[name] = TensorInfo(name, dtype, shape, file_name, base + b, base + e)
    # As the format requires: the tensors' byte ranges tile the data section, with no overlap and no gap.
    position = base
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            what = "overlaps the tensor before it" if info.start < position else "leaves a gap before it"
            raise FormatError(f"has invalid offsets: {info.name!r} {what} (bytes {info.start - base}..{info.end - base})")
        position = info.end
    if data_len is not None and position - base > data_len:
        raise FormatError(f"is truncated: the header needs {position - base} bytes of tensor data, the file holds {data_len}")
    if data_len is not None and position - base < data_len:
        raise FormatError(f"has {data_len - (position - base)} bytes after its last tensor, which the format does not allow")
    ordered = dict(sorted(tensors.items(), key=lambda kv: kv[1].start))
    return ordered, {str(k): str(v) for k, v in meta.items()}


def header_bytes(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """Build a header for tensors written in the given order. Returns (header incl. length, offsets)."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offsets, pos = [], 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offsets


def tensor_names(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file, or [] when it cannot be read as one."""
    try:
        return list(read_header(Path(path))[0])
    except (OSError, FormatError):
        return []
