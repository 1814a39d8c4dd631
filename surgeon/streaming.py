"""Block streaming: tensor arithmetic over whole checkpoints in bounded memory.

    with BlockStream() as stream:
        for start, (v, r) in stream.blocks([(vlm, name), (llm, llm_name)], shape):
            delta = stream.scratch("delta", v.shape)
            torch.sub(r, v, out=delta)                       # fp32, one block of rows
            stream.write_rows(writer, name, start, delta)    # cast and written in the background

(``blocks`` yields one stacked tensor; unpacking it gives each source's block.)

A tensor is cut into blocks of whole rows (``row_blocks``, at most ``BLOCK_ELEMENTS`` elements)
and processed in a three-stage pipeline: a reading thread reads each source's next block straight
into a reused buffer of its stored dtype (``readinto``: no mmap, no fresh allocation) and converts
it to fp32; the caller computes on the current block; a writing thread casts and writes the
previous result. Peak memory is a fixed handful of blocks whatever the size of the model or of its
largest tensor, reads and writes overlap the arithmetic, and no time goes to page-faulting fresh
allocations.

The blocks a stream yields and the buffers ``scratch`` returns are scratch: free to overwrite,
valid until the next block. ``write_rows`` may be given any of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from surgeon.checkpoint import Checkpoint
from surgeon.output import ShardedWriter

BLOCK_ELEMENTS = 1 << 23  # 8M elements: 32 MB per fp32 block
Source = tuple[Checkpoint, str]


def row_blocks(shape: tuple[int, ...], rows: int | None = None, max_elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    """Split the first ``rows`` rows (default: all) of a tensor of ``shape`` into ``(start, stop)``
    row ranges of at most ``max_elements`` elements each (at least one row per block). A 0-d
    tensor is one block ``(0, 1)``."""
    if not shape:
        return [(0, 1)]
    total = shape[0] if rows is None else min(rows, shape[0])
    step = max(1, max_elements // max(1, math.prod(shape[1:])))
    return [(a, min(a + step, total)) for a in range(0, total, step)]


def compute_threads(available: int) -> int:
    """Intra-op threads for streaming arithmetic: one core is left to the reading and writing
    threads and the kernel's copies, and more than 8 do not help memory-bound elementwise work. On
    small or busy machines this matters: idle OpenMP threads spin and starve the reader (measured
    on 2 shared cores: 2x slower with 2 threads than with 1)."""
    return max(1, min(available - 1, 8))


class BlockStream:
    """Reusable buffers and reading / writing threads for streaming blocks of tensors.

    Blocks alternate between two slots of buffers: while the caller works on one slot, the reader
    fills the other, and the writer drains the one before. ``threads`` sets torch's intra-op
    threads while the stream is open (default ``compute_threads``).
    """

    def __init__(self, max_elements: int = BLOCK_ELEMENTS, threads: int | None = None) -> None:
        self.max_elements = max_elements
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="surgeon-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="surgeon-write")
        self._writes: list[Future | None] = [None, None]
        self._slot = 0
        self._threads = torch.get_num_threads()
        torch.set_num_threads(threads or compute_threads(self._threads))

    def scratch(self, key: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A reused contiguous buffer of ``shape`` for role ``key`` in the current block's slot."""
        return self._buffer(f"{key}@{self._slot}", shape, dtype)

    def _buffer(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        flat = self._flat.get((key, dtype))
        if flat is None or flat.numel() < n:
            flat = self._flat[(key, dtype)] = torch.empty(max(n, 1), dtype=dtype)
        return flat[:n].view(tuple(shape))

    def blocks(
        self,
        sources: Sequence[Source],
        shape: tuple[int, ...],
        start: int = 0,
        stop: int | None = None,
        fp32: bool = True,
        extra: int = 0,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first row, stacked)`` for rows ``start .. stop`` (default: to the end) of
        tensors of ``shape``; each source may have more rows, only these are read.

        ``stacked[j]`` is source j's block, converted to fp32, and ``extra`` more rows of scratch
        follow: one contiguous ``(len(sources) + extra, rows, …)`` tensor, so that a Gram matrix of
        several blocks is one matrix product. ``fp32=False`` keeps the stored dtype instead (all
        sources must share it). Every write handed to ``write_rows`` has finished when the
        iteration ends.
        """
        end = (shape[0] if shape else 1) if stop is None else stop
        sub = (end - start, *shape[1:]) if shape else ()
        ranges = [(a + start, b + start) for a, b in row_blocks(sub, None, self.max_elements)]
        if not ranges:
            return
        dtypes = {ckpt.tensors[name].torch_dtype for ckpt, name in sources}
        if not fp32 and len(dtypes) != 1:
            raise ValueError(f"blocks of mixed dtypes {sorted(map(str, dtypes))} need fp32=True")
        dtype = torch.float32 if fp32 else dtypes.pop()

        def load(slot: int, a: int, b: int) -> torch.Tensor:
            block_shape = (b - a, *shape[1:]) if shape else ()
            stacked = self._buffer(f"in@{slot}", (len(sources) + extra, *block_shape), dtype)
            for j, (ckpt, name) in enumerate(sources):
                stored = ckpt.tensors[name].torch_dtype
                if stored == dtype:
                    ckpt.read_into(name, stacked[j], a)
                else:
                    stacked[j].copy_(ckpt.read_into(name, self._buffer(f"raw.{j}", block_shape, stored), a))
            return stacked

        self._drain(0)
        pending = self._reader.submit(load, 0, *ranges[0])
        try:
            for i, (a, _) in enumerate(ranges):
                stacked = pending.result()
                self._slot = i % 2
                if i + 1 < len(ranges):
                    self._drain((i + 1) % 2)  # the next slot's last write must be out before reuse
                    pending = self._reader.submit(load, (i + 1) % 2, *ranges[i + 1])
                yield a, stacked
        finally:  # also when the consumer stops early: nothing may still use the buffers
            pending.exception()
            self._drain(0)
            self._drain(1)

    def write_rows(self, writer: ShardedWriter, name: str, start: int, rows: torch.Tensor) -> None:
        """``writer.write_rows(name, start, rows)`` on the writing thread (inside ``blocks`` only)."""
        self._writes[self._slot] = self._writer.submit(writer.write_rows, name, start, rows)

    def _drain(self, slot: int) -> None:
        pending, self._writes[slot] = self._writes[slot], None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._flat.clear()
        torch.set_num_threads(self._threads)

    def __enter__(self) -> BlockStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
