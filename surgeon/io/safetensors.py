"""The safetensors file format, read and written one tensor at a time.

Headers are ``surgeon.io.header`` (no torch). Tensors are read
with ``readinto`` into a fresh tensor (no mmap), so resident memory holds one tensor at a time
however large the file is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import torch

from surgeon.io.header import FormatError, TensorInfo, header_bytes

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


def read_tensor(f: BinaryIO, info: TensorInfo, rows: int | None = None, start: int = 0) -> torch.Tensor:
    """Read one tensor, or ``rows`` of its rows from row ``start`` on, from an open file into a new
    CPU tensor. Row ranges are clipped to the tensor; a 0-d tensor is always read whole."""
    if not info.shape or (rows is None and start == 0):
        shape = info.shape
    else:
        first = min(start, info.shape[0])
        stop = info.shape[0] if rows is None else min(first + rows, info.shape[0])
        shape = (stop - first, *info.shape[1:])
    out = torch.empty(shape, dtype=DTYPES[info.dtype])
    return read_into(f, info, out, start if info.shape else 0)


def read_into(f: BinaryIO, info: TensorInfo, out: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Fill ``out`` (contiguous, the stored dtype, ``len(out)`` rows) with the tensor's rows from
    row ``start`` on, straight from the file: no intermediate copy, no mmap. Reads are positional
    (``preadv``) where the OS has them, so threads may share one file object."""
    if out.dtype != DTYPES[info.dtype] or not out.is_contiguous():
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
