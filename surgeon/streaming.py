"""Block streaming: tensor arithmetic over whole checkpoints in bounded memory, near I/O speed.

    with BlockStream() as stream:
        def delta(x):                          # x: fp32 tile [θ(R), θ(V), scratch]
            return torch.sub(x[0], x[1], out=x[2])
        stream.run([(llm, llm_name), (vlm, name)], shape, delta, out=(writer, name), extra=1)

A tensor is cut into blocks of whole rows (``row_blocks``, at most ``BLOCK_ELEMENTS`` elements),
processed in a three-stage pipeline:

1. a reading thread reads each source's next block straight into a reused buffer of its stored
   dtype (``readinto``: no mmap, no fresh allocation);
2. the calling thread walks the current block in tiles of about ``TILE_ELEMENTS`` (small enough to
   stay in the CPU's L2 cache), converts each tile to fp32, calls ``fn`` on it, and casts the
   result into an output block of the written dtype;
3. a writing thread writes the previous output block.

With ``fp32=False`` (arithmetic that needs no conversion, like a fused ``lerp`` computing in fp32
inside the kernel) ``fn`` gets whole blocks in their stored dtype instead.

Working tile by tile reads and writes each block's bytes in memory about once, instead of once per
arithmetic pass: measured on a shared 2-core VM, 1.6x faster than whole-block passes. Peak memory
is a fixed handful of blocks, whatever the size of the model or of its largest tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from surgeon.checkpoint import Checkpoint
from surgeon.output import ShardedWriter

BLOCK_ELEMENTS = 1 << 23  # 8M elements per source and block: 16 MB in bf16
TILE_ELEMENTS = 1 << 17  # 128K elements: a tile's fp32 rows stay in L2
Source = tuple[Checkpoint, str]
TileFn = Callable[[torch.Tensor], "torch.Tensor | None"]


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
    """Reusable buffers and reading / writing threads for streaming tensors block by block.

    Blocks alternate between two slots of buffers: while the caller works on one slot, the reader
    fills the other and the writer drains the one before. ``threads`` sets torch's intra-op
    threads while the stream is open (default ``compute_threads``).
    """

    def __init__(self, max_elements: int | None = None, tile_elements: int | None = None, threads: int | None = None) -> None:
        self.max_elements = max_elements or BLOCK_ELEMENTS
        self.tile_elements = tile_elements or TILE_ELEMENTS
        self._flat: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="surgeon-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="surgeon-write")
        self._writes: list[Future | None] = [None, None]
        self._threads = torch.get_num_threads()
        torch.set_num_threads(threads or compute_threads(self._threads))

    def _buffer(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A reused contiguous buffer of ``shape`` for role ``key`` (contents undefined)."""
        n = math.prod(shape)
        flat = self._flat.get((key, dtype))
        if flat is None or flat.numel() < n:
            flat = self._flat[(key, dtype)] = torch.empty(max(n, 1), dtype=dtype)
        return flat[:n].view(tuple(shape))

    def run(
        self,
        sources: Sequence[Source],
        shape: tuple[int, ...],
        fn: TileFn,
        out: tuple[ShardedWriter, str] | None = None,
        start: int = 0,
        stop: int | None = None,
        fp32: bool = True,
        extra: int = 0,
    ) -> None:
        """Call ``fn`` on every tile of rows ``start .. stop`` (default: to the end) of the
        sources, tensors of ``shape`` (a source may have more rows; only these are read), in order.

        ``fn`` gets one contiguous ``(len(sources) + extra, rows, …)`` tensor: source j's rows in
        fp32, then ``extra`` rows of scratch; all of it is scratch to ``fn``. With ``fp32=False``
        the rows keep their stored dtype (which all sources must share) and ``fn`` gets whole
        blocks instead of tiles: there is no conversion to keep in cache. With ``out=(writer, name)``,
        ``fn`` returns the tile's result for those rows of ``name``, which is cast to its dtype and
        written; everything handed to the writer is out when ``run`` returns.
        """
        dtypes = [ckpt.tensors[name].torch_dtype for ckpt, name in sources]
        if not fp32 and len(set(dtypes)) != 1:
            raise ValueError(f"tiles of mixed dtypes {sorted(map(str, set(dtypes)))} need fp32=True")
        work = torch.float32 if fp32 else dtypes[0]
        shape2 = shape or (1,)  # a 0-d tensor is streamed as one row
        end = shape2[0] if stop is None else stop
        ranges = [(a + start, b + start) for a, b in row_blocks((end - start, *shape2[1:]), None, self.max_elements)]
        if not ranges:
            return
        row = math.prod(shape2[1:])
        tile_rows = max(1, self.tile_elements // max(1, row))
        out_dtype = out[0].dtype(out[1]) if out else None

        def load(slot: int, a: int, b: int) -> list[torch.Tensor] | torch.Tensor:
            if not fp32:  # no conversion: read straight into the stacked block fn gets whole
                stacked = self._buffer(f"in@{slot}", (len(sources) + extra, b - a, *shape2[1:]), work)
                for j, (ckpt, name) in enumerate(sources):
                    ckpt.read_into(name, stacked[j] if shape else stacked[j].view(()), a)
                return stacked
            bufs = []
            for j, (ckpt, name) in enumerate(sources):
                buf = self._buffer(f"raw{j}@{slot}", (b - a, *shape2[1:]), dtypes[j])
                ckpt.read_into(name, buf if shape else buf.view(()), a)
                bufs.append(buf)
            return bufs

        self._drain(0)
        pending = self._reader.submit(load, 0, *ranges[0])
        try:
            for i, (a, b) in enumerate(ranges):
                raw = pending.result()
                slot = i % 2
                if i + 1 < len(ranges):
                    self._drain(1 - slot)  # the next slot's last write must be out before reuse
                    pending = self._reader.submit(load, 1 - slot, *ranges[i + 1])
                result = None
                if isinstance(raw, torch.Tensor):  # stored dtype: one call on the whole block
                    y = fn(raw)
                    if out_dtype is not None and y is not None:
                        result = y if y.dtype == out_dtype and y.is_contiguous() else self._cast(f"out@{slot}", y, out_dtype)
                else:
                    if out_dtype is not None:
                        result = self._buffer(f"out@{slot}", (b - a, *shape2[1:]), out_dtype)
                    for t0 in range(0, b - a, tile_rows):
                        t1 = min(t0 + tile_rows, b - a)
                        x = self._buffer("tile", (len(sources) + extra, t1 - t0, *shape2[1:]), work)
                        for j, r in enumerate(raw):
                            x[j].copy_(r[t0:t1])
                        y = fn(x)
                        if result is not None:
                            result[t0:t1].copy_(y)  # type: ignore[arg-type]
                if out and result is not None:
                    self._writes[slot] = self._writer.submit(out[0].write_rows, out[1], a, result if shape else result.view(()))
        finally:  # also on error: nothing may still use the buffers
            pending.exception()
            self._drain(0)
            self._drain(1)

    def _cast(self, key: str, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = self._buffer(key, y.shape, dtype)
        return out.copy_(y)

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
