"""Peak memory and throughput of ``surgeon train`` against TRL's SFTTrainer on the CPU, each case in
a fresh process (so each peak RSS is that case's alone), alternating the cases in every round (a
benchmark, not a test).

    python bench/train_vs_trl.py                       # the 23M-parameter shape of gpu_train.py, fp32
    python bench/train_vs_trl.py --repeat 5 --seq 512

Every case is ``bench/gpu_train.py --device cpu --shape 23m --cases CASE``: the same model, the same
batches of one image+text sample, the same steps, LoRA r=16 on attn+mlp or full fine-tuning of the
language model. The table gives medians over the rounds and surgeon / TRL ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="23m")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "gpu")
    args = parser.parse_args()
    cases = ("lora", "trl-lora", "full", "trl-full")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for _ in range(args.repeat):
        for case in cases:
            cmd = [sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--device", "cpu", "--shape", args.shape, "--dtype", "float32",
                   "--mixed-precision", "no", "--cases", case, "--steps", str(args.steps), "--warmup", "1", "--seq", str(args.seq),
                   "--batch", str(args.batch), "--work", str(args.work)]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[case].append(json.loads((args.work / args.shape / "gpu-train.json").read_text())["results"][case])
    med = {c: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_memory")} for c, rs in runs.items()}
    print(f"{args.shape} shape, fp32 on the CPU, batch {args.batch} × ~{args.seq} tokens, {args.steps} steps; medians of {args.repeat} rounds")
    for case, m in med.items():
        peaks = [round(r["peak_memory"] / 2**20) for r in runs[case]]
        print(f"  {case:<9} {m['tokens_per_s']:8.0f} tokens/s   peak RSS {m['peak_memory'] / 2**20:7.0f} MiB   runs {peaks}")
    for ours, theirs in (("lora", "trl-lora"), ("full", "trl-full")):
        a, b = med[ours], med[theirs]
        print(f"  {ours}: surgeon / TRL peak RSS {a['peak_memory'] / b['peak_memory']:.3f}×, tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}×")


if __name__ == "__main__":
    main()
