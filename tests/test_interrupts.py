"""Killed, stopped and concurrent runs: SIGTERM is handled like Ctrl-C (nothing half-written, a
clear line, exit 143); two runs never write one output; a stopped training run says how to resume."""

from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from helpers import assert_one_line_error

SLOW = textwrap.dedent(
    """
    import sys, time
    import surgeon.io.output as output
    write = output.ShardedWriter.write_rows
    def slow(self, *a, **k):
        time.sleep(float({delay!r}))
        return write(self, *a, **k)
    output.ShardedWriter.write_rows = slow
    from surgeon.cli import main
    main(sys.argv[1:])
    """
)


def _start(tmp_path, args, delay=0.3):
    script = tmp_path / "slow.py"
    script.write_text(SLOW.format(delay=delay))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SURGEON_DEBUG", None)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_mid_merge_leaves_nothing_and_a_second_writer_fails_at_once(cli, vlm, llm, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", "--reasoning", llm, "--vlm", vlm, "-o", out, "--method", "task-arithmetic"]
    run = _start(tmp_path, args)
    try:
        assert _wait_for(lambda: any(p.name.startswith(".merged.surgeon-tmp-") for p in tmp_path.iterdir()))
        second = cli(*args[:-2], "--method", "ties")  # the same output, another method, no --overwrite
        assert_one_line_error(second, "another surgeon run", f"(process {run.pid})", str(out), "choose another output")
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "Error: interrupted; no output was written" and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.py"]  # no temp folder, no lock file, no output


@pytest.mark.slow
def test_a_stopped_training_run_keeps_its_checkpoint_and_says_how_to_resume(vlm, shapes_data, tmp_path):
    out = tmp_path / "run"
    args = ["train", vlm, "--data", shapes_data("trl"), "-o", out, "--max-steps", "400", "--save-steps", "1", "--batch-size", "1"]
    run = _start(tmp_path, args, delay=0)
    try:
        ckpts = tmp_path / "run-checkpoints"
        assert _wait_for(lambda: (ckpts / "checkpoint-2" / "state.json").exists())
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Error: interrupted; ") and "checkpoint-" in last and "--resume" in last, last
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".surgeon-" in p.name]
    kept = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*"))
    assert kept and f"checkpoint-{kept[-1]}" in last
    steps = [json.loads(x)["step"] for x in (ckpts / "metrics.jsonl").read_text().splitlines()]
    assert steps[: kept[-1]] == list(range(1, kept[-1] + 1))
