"""Sharded training on the CPU: peak memory per process of 2-process FSDP against 1 process, the
step time of FSDP against DDP at 2 processes, and the memory plan against what the runs use.

    python bench/train_memory.py                          # 300M-parameter model, 3 steps
    python bench/train_memory.py --sizes 60m,150m,300m    # several sizes (plan against peak RSS)

Builds, under ``--work`` (default ``bench/_work``, git-ignored), a Qwen2.5-VL of each size with
random fp32 weights (the language model grows; the vision tower stays tiny) and the synthetic
tagged dataset, then runs ``surgeon train --full`` (fp32, AdamW, seq up to ``--max-length``) as
fresh processes, one intra-op thread each, alternating the cases ``--repeat`` times:

    one     python -m surgeon.cli train …                         (1 process)
    ddp     torchrun --nproc-per-node 2 -m surgeon.cli train …     (DDP, gloo)
    fsdp    torchrun --nproc-per-node 2 -m surgeon.cli train … --fsdp

Peak memory is the largest ``ru_maxrss`` of the case's processes (``os.wait4`` on the launcher,
whose children are the ranks), i.e. the peak of the largest rank. Step time is the median of the
steps after the first (from ``metrics.jsonl``). The plan is ``surgeon train --dry-run`` for the CPU
with the same options. Ratios are of medians over the repeats. Results go to a table and to
``<work>/train-memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # language model shapes; every size keeps the tiny vision tower and the 512-token vocabulary
    "60m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8),
    "150m": dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=18, num_attention_heads=12, num_key_value_heads=12),
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16),
    "500m": dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=20),
}  # fmt: skip


def build(work: Path, size: str) -> tuple[Path, Path]:
    from surgeon.demo import tiny
    from surgeon.demo.synthetic import make_dataset

    model, data = work / f"vlm-{size}", work / "data"
    if not (model / "config.json").exists():
        tiny.build("qwen2_5_vl", model, **SIZES[size])
    if not (data / "data.jsonl").exists():
        make_dataset(data, n=48, seed=0)
    return model, data / "data.jsonl"


def run_case(case: str, model: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    train = ["-m", "surgeon.cli", "train", str(model), "--data", str(data), "-o", str(out), "--full",
             "--max-steps", str(args.steps), "--batch-size", "1", "--max-length", str(args.max_length), "--lr", "1e-5"]  # fmt: skip
    if case == "one":
        cmd = [sys.executable, *train, "--grad-accum", "2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *train] + (["--fsdp"] if case == "fsdp" else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"{case} failed:\n{err[-3000:]}")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [m["tokens"] / m["tokens_per_s"] for m in steps[1:] if m.get("tokens_per_s")]
    return {"peak_rss": usage.ru_maxrss * 1024, "step_s": statistics.median(times), "wall_s": wall}


def plan(model: Path, case: str, args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "surgeon.cli", "train", str(model), "--full", "--batch-size", "1", "--max-length",
           str(args.max_length), "--mixed-precision", "no", "--dry-run", "--json"]  # fmt: skip
    if case != "one":
        cmd += ["--num-processes", "2"] + (["--fsdp"] if case == "fsdp" else [])
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    cpu_runtime = 10**9  # the plan's CPU allowance (surgeon.training.plan.RUNTIME_BYTES)
    return result["per_process_bytes"] - result["parts"]["runtime"] + cpu_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="300m", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cases", default="one,ddp,fsdp", help="which of one, ddp, fsdp to run (DDP holds two full copies)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for size in args.sizes.split(","):
        model, data = build(args.work, size)
        runs: dict[str, list[dict]] = {c: [] for c in args.cases.split(",")}
        for _ in range(args.repeat):
            for case in runs:
                runs[case].append(run_case(case, model, data, args.work / f"out-{case}", args))
        med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
        plans = {c: plan(model, c, args) for c in runs}
        results[size] = {"runs": med, "plans": plans}
        print(f"\n{size}: peak RSS per process (largest rank) and step time, fp32 full fine-tuning, 1 thread per process")
        for c in runs:
            m = med[c]
            print(f"  {c:<5} peak {m['peak_rss'] / 1e9:6.2f} GB   plan {plans[c] / 1e9:6.2f} GB ({plans[c] / m['peak_rss']:.2f}x)"
                  f"   step {m['step_s']:6.2f} s")  # fmt: skip
        if "fsdp" in med and "one" in med:
            print(f"  FSDP / one process peak memory: {med['fsdp']['peak_rss'] / med['one']['peak_rss']:.2f}x  (target <= 0.6)")
        if "fsdp" in med and "ddp" in med:
            print(f"  FSDP / DDP step time:           {med['fsdp']['step_s'] / med['ddp']['step_s']:.2f}x")
    (args.work / "train-memory.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
