"""Block streaming: row blocks, the read-ahead / write-behind pipeline, block-wise and raw writes."""

from __future__ import annotations

import threading

import pytest
import torch

from surgeon.hub.sources import open_checkpoint
from surgeon.io.output import ShardedWriter, TensorSpec
from surgeon.io.safetensors import write_file
from surgeon.io.streaming import BlockStream, Copy, Job, compute_threads, row_blocks


@pytest.fixture
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(37, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(37, 5, generator=g),
        "c": torch.randn(37, 5, generator=g).to(torch.bfloat16),
        "s": torch.tensor(3.5),
        "v": torch.randn(11, generator=g).half(),
    }
    (tmp_path / "m").mkdir()
    write_file(tmp_path / "m" / "model.safetensors", tensors)
    with open_checkpoint(tmp_path / "m") as c:
        yield c, tensors


def test_row_blocks():
    assert row_blocks((10, 4), max_elements=12) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_blocks((10, 4), rows=5, max_elements=12) == [(0, 3), (3, 5)]
    assert row_blocks((3, 100), max_elements=10) == [(0, 1), (1, 2), (2, 3)]  # at least one row
    assert row_blocks(()) == [(0, 1)] and row_blocks((0, 4)) == []
    assert compute_threads(1) == 1 and compute_threads(2) == 1 and compute_threads(64) == 8


def _collect(stream, sources, shape, **kw):
    tiles = []
    stream.run([Job(sources, shape, lambda x: tiles.append(x.clone()), **kw)])
    return tiles


def test_tiles_reassemble_every_tensor(ckpt):
    c, tensors = ckpt
    with BlockStream(max_elements=20, tile_elements=10) as stream:
        tiles = _collect(stream, [(c, "a"), (c, "b")], (37, 5), extra=1)
        assert [t.shape[1] for t in tiles] == [2, 2] * 9 + [1]  # blocks of 4 rows, tiles of 2
        assert all(t.shape[0] == 3 and t.dtype == torch.float32 for t in tiles)
        assert torch.equal(torch.cat([t[0] for t in tiles]), tensors["a"].float())
        assert torch.equal(torch.cat([t[1] for t in tiles]), tensors["b"])
        native = torch.cat([t[0] for t in _collect(stream, [(c, "a"), (c, "c")], (37, 5), start=30, fp32=False)])
        assert native.dtype == torch.bfloat16 and torch.equal(native, tensors["a"][30:])
        (s,) = _collect(stream, [(c, "s")], ())
        assert s.shape == (1, 1) and float(s[0, 0]) == 3.5
        with pytest.raises(ValueError, match="mixed dtypes"):
            stream.run([Job([(c, "a"), (c, "b")], (37, 5), lambda x: None, fp32=False)])


@pytest.mark.parametrize("workers", [1, 3])
def test_passes_see_every_row_first_and_read_it_once_when_it_fits(tmp_path, ckpt, monkeypatch, workers):
    """A job's passes run over all rows before its fn (here: the mean, then x − mean); rows that fit
    in ``block_elements`` are read once for every pass, larger ones once per pass, same result."""
    c, tensors = ckpt
    reads = []
    read_into = c.read_into
    monkeypatch.setattr(c, "read_into", lambda name, out, start=0: (reads.append(name), read_into(name, out, start))[1])
    expected = tensors["b"] - tensors["b"].sum()
    for block, expected_reads in ((200, 1), (20, 20)):  # 185 elements: one block read once, or 10 blocks read twice
        total, lock = torch.zeros((), dtype=torch.float64), threading.Lock()

        def add(x):
            with lock:
                total.add_(x[0].sum().double())

        reads.clear()
        (tmp_path / f"out{block}").mkdir()
        with ShardedWriter(tmp_path / f"out{block}", [TensorSpec("b", "F32", (37, 5))]) as w, BlockStream(tile_elements=10, workers=workers) as s:
            s.run([Job([(c, "b")], (37, 5), lambda x: x[0] - float(total), out=(w, "b"), passes=[(add, lambda: None)],
                       block_elements=block, parallel=True)])  # fmt: skip
        assert len(reads) == expected_reads
        assert float(total) == pytest.approx(float(tensors["b"].double().sum()))
        with open_checkpoint(tmp_path / f"out{block}") as out:
            assert torch.allclose(out.read("b"), expected, atol=1e-6)
    order = []  # no rows at all: every done still runs, in order, when the job's turn comes
    with BlockStream() as s:
        s.run([Job([(c, "b")], (37, 5), lambda x: None, done=lambda: order.append("first")),
               Job([(c, "b")], (37, 5), lambda x: None, stop=0, passes=[(lambda x: None, lambda: order.append("pass"))],
                   done=lambda: order.append("job"))])  # fmt: skip
    assert order == ["first", "pass", "job"]


def test_an_error_in_fn_leaves_the_stream_usable(ckpt):
    c, tensors = ckpt
    with BlockStream(max_elements=10) as stream:
        with pytest.raises(ZeroDivisionError, match="division by zero"):
            stream.run([Job([(c, "b")], (37, 5), lambda x: 1 / 0)])
        again = torch.cat([t[0] for t in _collect(stream, [(c, "b")], (37, 5))])
        assert torch.equal(again, tensors["b"])


def test_stream_writes_match_direct_writes(tmp_path, ckpt):
    c, tensors = ckpt
    specs = [TensorSpec("d", "BF16", (37, 5)), TensorSpec("a", "BF16", (37, 5)), TensorSpec("v", "F16", (11,)), TensorSpec("s", "F32", ())]
    (tmp_path / "out").mkdir()
    done = []
    with ShardedWriter(tmp_path / "out", specs) as w, BlockStream(max_elements=15, tile_elements=4) as stream:
        stream.run(
            [
                Job([(c, "b"), (c, "a")], (37, 5), lambda x: torch.sub(x[0], x[1], out=x[2]), out=(w, "d"), extra=1, done=lambda: done.append("d")),
                Copy(w, "a", c.handle(c.tensors["a"].file), c.tensors["a"].start),
                Job([(c, "v")], (11,), lambda x: x[0], out=(w, "v"), fp32=False, done=lambda: done.append("v")),
                Job([(c, "s")], (), lambda x: x[0] * 2, out=(w, "s")),
            ]
        )
    assert done == ["d", "v"]
    with open_checkpoint(tmp_path / "out") as out:
        assert torch.equal(out.read("d"), (tensors["b"] - tensors["a"].float()).to(torch.bfloat16))
        assert torch.equal(out.read("a"), tensors["a"]) and torch.equal(out.read("v"), tensors["v"])
        assert float(out.read("s")) == 7.0


def test_writer_refuses_incomplete_or_misplaced_rows(tmp_path):
    (tmp_path / "o").mkdir()
    w = ShardedWriter(tmp_path / "o", [TensorSpec("x", "F32", (4, 2))])
    w.write_rows("x", 0, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="do not fit"):
        w.write_rows("x", 3, torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_read_into_checks_its_buffer(ckpt):
    c, tensors = ckpt
    buf = torch.empty(3, 5, dtype=torch.bfloat16)
    assert torch.equal(c.read_into("a", buf, 34), tensors["a"][34:])
    assert torch.equal(c.read("a", rows=2, start=5), tensors["a"][5:7])
    with pytest.raises(ValueError, match="run past"):
        c.read_into("a", buf, 35)
    with pytest.raises(ValueError, match="contiguous BF16"):
        c.read_into("a", torch.empty(3, 5), 0)
