"""The writer: shards and index that transformers and safetensors read; all-or-nothing folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from surgeon.errors import ConfigError, OutputExistsError
from surgeon.io.output import ShardedWriter, TensorSpec, output_folder, parse_size, plan_shards


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(64, 32, generator=g),
        "w2": torch.randn(16, generator=g).to(torch.bfloat16),
        "w3": torch.randn(100, 8, generator=g),
        "w4": torch.randn(3, 3, generator=g).half(),
    }


def _specs(tensors):
    from surgeon.io.safetensors import DTYPE_CODES

    return [TensorSpec(n, DTYPE_CODES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


@pytest.mark.parametrize("shard_size,expect_files", [(10**9, 1), (3000, 4)])
def test_sharded_output_loads_with_safetensors(tmp_path, shard_size, expect_files):
    tensors = _tensors()
    with ShardedWriter(tmp_path, _specs(tensors), shard_size=shard_size) as w:
        for name in reversed(list(tensors)):  # any write order
            w.write(name, tensors[name])
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == expect_files
    if expect_files == 1:
        assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
        loaded = load_file(str(tmp_path / "model.safetensors"))
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert files[0] == f"model-00001-of-{expect_files:05d}.safetensors"
        loaded = {}
        for f in files:
            loaded.update(load_file(str(tmp_path / f)))
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def test_writer_casts_to_planned_dtype_and_checks_shapes(tmp_path):
    with ShardedWriter(tmp_path, [TensorSpec("a", "BF16", (2, 2))]) as w:
        with pytest.raises(ValueError, match="planned shape"):
            w.write("a", torch.ones(3))
        w.write("a", torch.ones(2, 2))
    assert load_file(str(tmp_path / "model.safetensors"))["a"].dtype == torch.bfloat16


def test_writer_refuses_to_finish_with_missing_tensors(tmp_path):
    w = ShardedWriter(tmp_path, [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))])
    w.write("a", torch.ones(2))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_large_tensor_gets_its_own_shard():
    plan = plan_shards([TensorSpec("a", "F32", (10,)), TensorSpec("big", "F32", (1000,)), TensorSpec("c", "F32", (10,))], 100)
    assert [[s.name for s in shard] for shard in plan] == [["a"], ["big"], ["c"]]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    with pytest.raises(ConfigError, match="shard_size"):
        parse_size("five gigs")


def test_output_folder_appears_only_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with output_folder(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with output_folder(final) as tmp:
        (tmp / "a.txt").write_text("x")
    assert (final / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_folder_refuses_non_empty_unless_overwrite(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with output_folder(final) as tmp:  # empty folder is fine
        (tmp / "a.txt").write_text("1")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with output_folder(final):
            pass
    with output_folder(final, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_killed_run_leaves_no_complete_looking_folder(tmp_path):
    """SIGKILL mid-write: the output name never appears; only a hidden temp folder may remain."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from surgeon.io.output import ShardedWriter, TensorSpec, output_folder
        with output_folder({str(tmp_path / "out")!r}) as tmp:
            with ShardedWriter(tmp, [TensorSpec("a", "F32", (1000,)), TensorSpec("b", "F32", (1000,))], shard_size=4000) as w:
                w.write("a", torch.ones(1000))
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    assert all(p.name.startswith((".out.surgeon-tmp-", ".out.surgeon-lock")) for p in tmp_path.iterdir())


def test_a_later_run_removes_what_a_killed_run_left_and_says_so(tmp_path, caplog):
    """kill -9 mid-write leaves a hidden temp folder (a partial shard); the next run for the same
    output removes it (its owner is gone: it no longer holds the output's claim) and logs it."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from surgeon.io.output import ShardedWriter, TensorSpec, output_folder
        with output_folder({str(tmp_path / "out")!r}) as tmp:
            with ShardedWriter(tmp, [TensorSpec("a", "F32", (100000,))], shard_size=10**9) as w:
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == -signal.SIGKILL
    [stale] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.surgeon-tmp-")]
    with caplog.at_level("WARNING", logger="surgeon"):
        with output_folder(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
    assert not stale.exists() and (tmp_path / "out" / "x").exists()
    assert f"removed {stale.name}" in caplog.text and "interrupted run" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_writer_of_the_same_output_fails_at_once_and_a_live_temp_is_untouched(tmp_path):
    from surgeon.errors import OutputBusyError

    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import pathlib, time
        from surgeon.io.output import output_folder
        with output_folder({str(tmp_path / "out")!r}) as tmp:
            (tmp / "partial").write_text("working")
            pathlib.Path({str(ready)!r}).write_text("1")
            time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        [live] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.surgeon-tmp-")]
        with pytest.raises(OutputBusyError, match=rf"another surgeon run \(process {holder.pid}\) is writing .*out right now"):
            with output_folder(tmp_path / "out"):
                pass
        assert (live / "partial").read_text() == "working"  # the live run's temp folder is left alone
    finally:
        holder.kill()
        holder.wait()


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        with output_folder(tmp_path / "f", overwrite=True):
            pass
    assert os.path.isfile(tmp_path / "f")
