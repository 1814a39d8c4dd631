"""Step time of ``surgeon train`` by intra-op thread count: ``--threads 1`` against every core of
this machine and against the default (no flag, no OMP_NUM_THREADS), alternating in each round (a
benchmark, not a test).

    python bench/train_threads.py                       # the 60M-parameter model of train_memory.py
    python bench/train_threads.py --size 150m --repeat 5

Each case is a fresh process running ``surgeon train --full`` for ``--steps`` steps; its step time is
the median of the steps after the first (from ``metrics.jsonl``), and the table gives the median
over the rounds and the ratio to one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from train_memory import build  # noqa: E402


def step_time(model: Path, data: Path, out: Path, threads: int | None, args: argparse.Namespace) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "surgeon.cli", "train", str(model), "--data", str(data), "-o", str(out), "--full",
           "--max-steps", str(args.steps), "--batch-size", "1", "--max-length", str(args.max_length), "--lr", "1e-5"]  # fmt: skip
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    used = json.loads((out / "surgeon.json").read_text())["stats"]["threads"]
    return statistics.median(m["tokens"] / m["tokens_per_s"] for m in steps[1:]), used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="60m")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    args = parser.parse_args()
    model, data = build(args.work, args.size)
    cores = len(os.sched_getaffinity(0))
    cases = {"1 thread": 1, f"{cores} threads (all cores)": cores, "default": None}
    runs: dict[str, list[float]] = {name: [] for name in cases}
    used: dict[str, int] = {}
    for _ in range(args.repeat):
        for name, threads in cases.items():
            seconds, used[name] = step_time(model, data, args.work / "out-threads", threads, args)
            runs[name].append(seconds)
    one = statistics.median(runs["1 thread"])
    print(f"{args.size} model, full fine-tuning, {args.steps} steps, {cores} cores; medians of {args.repeat} alternating rounds")
    for name, times in runs.items():
        t = statistics.median(times)
        print(f"  {name:<24} {used[name]} thread(s)  step {t:6.2f} s  {t / one:5.2f}× one thread   runs {[round(x, 2) for x in times]}")


if __name__ == "__main__":
    main()
