"""Quantized weights written back: merged values quantized again in the input's FP8 layout
(``surgeon merge --requantize``; docs/methods.md §9).

    q, scale = quantize_fp8(values, Grid(128, 128), (out, inp), torch.float8_e4m3fn)
    writer = Requantizer(sharded_writer, scheme, stored_checkpoint)   # a streaming job's ``out``
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from surgeon.io.quantized import Grid, QuantTensor, Scheme

if TYPE_CHECKING:
    import torch


def quantize_fp8(
    values: torch.Tensor, grid: Grid, shape: tuple[int, int], dtype: torch.dtype, scale_dtype: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole bands of rows (a multiple of ``grid.rows``, or the last rows) of a [out, in] weight as
    float8 values and one fp32 scale per grid cell: scale = max|w| of the cell / the format's
    largest value (rounded to ``scale_dtype`` when given), q = w / scale (cells of zeros get scale 1)."""
    import torch

    rows, inp = values.shape
    largest = torch.finfo(dtype).max
    bands = math.ceil(rows / grid.rows) if grid.rows < shape[0] else 1
    band_rows = grid.rows if grid.rows < shape[0] else rows
    cells = math.ceil(inp / grid.cols)
    padded = torch.zeros(bands * band_rows, cells * grid.cols, dtype=torch.float32)
    padded[:rows, :inp] = values
    amax = padded.abs().view(bands, band_rows, cells, grid.cols).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / largest, torch.ones_like(amax))
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    expanded = scale.repeat_interleave(band_rows, 0)[:rows].repeat_interleave(grid.cols, 1)[:, :inp]
    q = (values / expanded).clamp(-largest, largest).to(dtype)
    return q, scale


class Requantizer:
    """A writer for a streaming job's output rows of quantized weights: it collects whole bands of
    ``grid.rows`` rows (the whole tensor for one scale per tensor), quantizes each to the weight's
    stored float8 format with new scales, and writes values and scales to ``writer`` under the
    stored names, so the output keeps the input's scheme. Rows of other tensors pass through."""

    def __init__(self, writer: Any, scheme: Scheme, stored: Any) -> None:
        import threading

        self.writer, self.scheme, self.stored = writer, scheme, stored
        self._bands: dict[tuple[str, int], tuple[Any, int]] = {}
        self._lock = threading.Lock()

    def dtype(self, name: str) -> Any:
        import torch

        return torch.float32 if name in self.scheme.tensors else self.writer.dtype(name)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        q = self.scheme.tensors.get(name)
        if q is None:
            self.writer.write_rows(name, start, rows)
            return
        out = q.shape[0]
        step = q.grid.rows if q.grid.rows < out else out
        stop = start + rows.shape[0]
        lo = -(-start // step) * step  # the whole bands inside this block: written at once
        hi = out if stop == out else (stop // step) * step
        if lo < hi:
            self._write_bands(q, lo // step, lo, rows[lo - start : hi - start])
        else:
            lo = hi = stop
        for a, b in ((start, min(lo, stop)), (max(hi, start), stop)):  # the edges: completed across blocks
            if a < b:
                self._collect(q, step, a, rows[a - start : b - start])

    def _collect(self, q: QuantTensor, step: int, start: int, rows: torch.Tensor) -> None:
        import torch

        band = start // step
        first, last = band * step, min((band + 1) * step, q.shape[0])
        with self._lock:
            buffer, filled = self._bands.get((q.name, band)) or (torch.empty(last - first, q.shape[1]), 0)
            buffer[start - first : start - first + rows.shape[0]] = rows
            filled += rows.shape[0]
            done = filled == last - first
            if done:
                self._bands.pop((q.name, band), None)
            else:
                self._bands[(q.name, band)] = (buffer, filled)
        if done:
            self._write_bands(q, band, first, buffer)

    def _write_bands(self, q: QuantTensor, band: int, first: int, values: torch.Tensor) -> None:
        from surgeon.io.safetensors import DTYPES

        stored = self.stored.tensors
        values_q, scale = quantize_fp8(values, q.grid, q.shape, DTYPES[stored[q.stored].dtype], DTYPES[stored[q.scale].dtype])
        self.writer.write_rows(q.stored, first, values_q)
        scale_shape = tuple(stored[q.scale].shape)
        if math.prod(scale_shape) == 1:
            self.writer.write_rows(q.scale, 0, scale.reshape(scale_shape))
        else:
            self.writer.write_rows(q.scale, band, scale.reshape(-1, *scale_shape[1:]))
