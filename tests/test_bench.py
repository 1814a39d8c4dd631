"""The GPU benchmark script runs end to end in its tiny CPU shape (its numbers are for a GPU)."""

from __future__ import annotations

import pytest

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
def test_gpu_train_benchmark_runs_every_case_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_train", BENCH / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--seq", "64", "--batch", "1", "--work", str(tmp_path)]
    report = module.main(argv)
    assert set(report["results"]) == set(module.CASES)
    for case, r in report["results"].items():
        assert r["tokens_per_s"] > 0 and r["peak_memory"] > 0, case
    assert (tmp_path / "tiny" / "gpu-train.json").exists()


@pytest.mark.slow
def test_train_lengths_benchmark_runs_its_cases_in_the_tiny_shape(tmp_path):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, str(BENCH / "train_lengths.py"), "--tiny", "--cases", "packed,padded,mem-surgeon,mem-plain", "--work", str(tmp_path / "w")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "w-tiny" / "train-lengths.json").read_text())
    assert report["medians"]["packed"]["padding"] == 0 and report["medians"]["padded"]["padding"] > 0
    assert report["ratios"]["packed/padded tokens/s"] > 0 and "surgeon/plain peak RSS" not in report["ratios"]  # (TRL left out)
    assert 0.3 < report["ratios"]["mem-surgeon plan/peak RSS"] < 3
