"""Wall time and peak memory of ``surgeon inspect`` on a local folder, against ``surgeon --help``
(the command line's own start-up) and ``python -c "import torch"`` (what any torch-based tool pays
before it reads anything), alternating the three in each round (a benchmark, not a test).

    python bench/inspect_startup.py                  # the Qwen2.5-VL 1.5B-shaped folder of prior_merge.py
    python bench/inspect_startup.py --rounds 9 --model ./my-vlm

Each run is a fresh process started by a bare launcher that reads its wall time and ``ru_maxrss``
(``os.wait4``); the table gives medians over the rounds and the ratios against both baselines.
Targets: ≤ 0.5 s and ≤ 100 MB for ``surgeon inspect``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from prior_merge import LAUNCHER, _configs, build  # noqa: E402


def run(cmd: list[str]) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True, check=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if r["code"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return r["seconds"], r["maxrss_kb"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A local model folder (default: build or reuse the 1.5B-shaped VLM).")
    parser.add_argument("--work", default=str(ROOT / "bench" / "_work"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    model = Path(args.model) if args.model else Path(args.work) / "1.5b" / "vlm"
    if not args.model:
        build(model, _configs("1.5b")[1], causal_lm=False, seed=1)
    surgeon = [sys.executable, "-m", "surgeon.cli"]
    cases = {
        "surgeon inspect": [*surgeon, "inspect", str(model)],
        "surgeon --help": [*surgeon, "--help"],
        "import torch": [sys.executable, "-c", "import torch"],
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, cmd in cases.items():
            runs[name].append(run(cmd))
    median = {name: (statistics.median(t for t, _ in r), statistics.median(m for _, m in r)) for name, r in runs.items()}
    size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
    print(f"{model} ({size:.2f} GB of safetensors), medians of {args.rounds} alternating rounds")
    print(f"{'case':<18}{'seconds':>9}{'peak RSS':>11}{'× --help':>10}{'× import torch':>16}")
    for name, (t, m) in median.items():
        help_t, torch_t = median["surgeon --help"][0], median["import torch"][0]
        print(f"{name:<18}{t:>8.2f}s{m:>8.0f} MB{t / help_t:>9.2f}×{t / torch_t:>15.2f}×")
    t, m = median["surgeon inspect"]
    print(f"targets: ≤ 0.5 s {'met' if t <= 0.5 else 'MISSED'}, ≤ 100 MB {'met' if m <= 100 else 'MISSED'}")


if __name__ == "__main__":
    main()
