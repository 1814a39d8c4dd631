"""The safetensors file format, read and written one tensor at a time.

A safetensors file is ``u64 header_len | JSON header | data``; the header maps each tensor name to
its dtype, shape and ``data_offsets`` into the data section. Reading the header gives every name,
shape and dtype without touching data. Tensors are read with ``readinto`` into a fresh tensor
(no mmap), so resident memory holds one tensor at a time however large the file is.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
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
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: Path, file_name: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (tensors in data order, ``__metadata__``).

    Raises FormatError for a corrupt header, unknown dtype, inconsistent offsets, or a file whose
    data section is shorter than the header promises (a truncated download or copy).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"is {size} bytes long, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or n > size - 8:
            raise FormatError(f"has a corrupt header (declared length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"has a corrupt header (not JSON: {e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(header, dict):
        raise FormatError("has a corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    data_len = size - base
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"has a corrupt header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise FormatError(f"stores {name!r} as {dtype}, a dtype surgeon does not handle")
        expected = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if not (0 <= b <= e) or e - b != expected:
            raise FormatError(f"has inconsistent offsets for {name!r} ({b}..{e} for {expected} bytes)")
        tensors[name] = TensorInfo(name, dtype, shape, file_name or path.name, base + b, base + e)
    # As the format requires: the tensors' byte ranges tile the data section, with no overlap and no gap.
    position = base
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            what = "overlaps the tensor before it" if info.start < position else "leaves a gap before it"
            raise FormatError(f"has invalid offsets: {info.name!r} {what} (bytes {info.start - base}..{info.end - base})")
        position = info.end
    if position - base > data_len:
        raise FormatError(f"is truncated: the header needs {position - base} bytes of tensor data, the file holds {data_len}")
    if position - base < data_len:
        raise FormatError(f"has {data_len - (position - base)} bytes after its last tensor, which the format does not allow")
    ordered = dict(sorted(tensors.items(), key=lambda kv: kv[1].start))
    return ordered, {str(k): str(v) for k, v in meta.items()}


def read_tensor(f: BinaryIO, info: TensorInfo, rows: int | None = None, start: int = 0) -> torch.Tensor:
    """Read one tensor, or ``rows`` of its rows from row ``start`` on, from an open file into a new
    CPU tensor. Row ranges are clipped to the tensor; a 0-d tensor is always read whole."""
    if not info.shape or (rows is None and start == 0):
        shape = info.shape
    else:
        first = min(start, info.shape[0])
        stop = info.shape[0] if rows is None else min(first + rows, info.shape[0])
        shape = (stop - first, *info.shape[1:])
    out = torch.empty(shape, dtype=info.torch_dtype)
    return read_into(f, info, out, start if info.shape else 0)


def read_into(f: BinaryIO, info: TensorInfo, out: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Fill ``out`` (contiguous, the stored dtype, ``len(out)`` rows) with the tensor's rows from
    row ``start`` on, straight from the file: no intermediate copy, no mmap. Reads are positional
    (``preadv``) where the OS has them, so threads may share one file object."""
    if out.dtype != info.torch_dtype or not out.is_contiguous():
        raise ValueError(f"{info.name}: read_into needs a contiguous {info.dtype} tensor")
    if out.numel() == 0:
        return out
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    row_bytes = info.nbytes // info.shape[0] if info.shape else 0
    if start * row_bytes + len(view) > info.nbytes:
        raise ValueError(f"{info.name}: rows {start}.. of shape {tuple(out.shape)} run past {info.shape}")
    pos = info.start + start * row_bytes
    if hasattr(os, "preadv"):
        got = 0
        while got < len(view):
            n = os.preadv(f.fileno(), [view[got:]], pos + got)
            if n <= 0:
                break
            got += n
    else:
        f.seek(pos)
        got = f.readinto(view) or 0
    if got != len(view):
        raise FormatError(f"ended early while reading {info.name!r}")
    return out


def header_bytes(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """Build a header for tensors written in the given order. Returns (header incl. length, offsets)."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offsets, pos = [], 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offsets


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a small safetensors file in one go (for adapters and test fixtures)."""
    specs = [(n, DTYPE_CODES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    head, _ = header_bytes(specs, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors.values():
            f.write(tensor_bytes(t))
        f.flush()
        os.fsync(f.fileno())
