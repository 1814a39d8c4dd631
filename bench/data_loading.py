"""Peak memory and speed of ``surgeon train``'s data path as the dataset grows, measured in one run.

A tiny Qwen2.5-VL (built here) trains a fixed number of steps on JSONL files of N samples, each
pointing at one of 64 distinct 224×224 PNG files (a real dataset's images are files too). The
number of steps is the same for every N, so any growth of peak memory or time with N is the data
path's: the validation pass reads every line (no pixels), the encoder only the samples a batch
needs. Each run is its own process; peak RSS comes from ``wait4``. The smallest N is the baseline.
A second comparison trains the largest file with ``--num-workers 0`` and ``2``.

    python bench/data_loading.py [--sizes 1000,10000,100000] [--steps 20] [--workdir bench/_work/data]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _model(root: Path) -> Path:
    from surgeon.demo import tiny

    model = root / "vlm-224"
    if not model.exists():
        tiny.build("qwen2_5_vl", model)
        cfg = json.loads((model / "processor_config.json").read_text())
        side = 224 * 224
        cfg["image_processor"].update({"max_pixels": side, "min_pixels": side, "size": {"shortest_edge": side, "longest_edge": side}})
        (model / "processor_config.json").write_text(json.dumps(cfg))
    return model


def _data(root: Path, n: int) -> Path:
    import random

    from PIL import Image

    images = root / "img"
    if not images.exists():
        images.mkdir(parents=True)
        rng = random.Random(0)
        for i in range(64):
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (224, 224), colour).save(images / f"{i}.png")
    data = root / f"data-{n}.jsonl"
    if not data.exists():
        with data.open("w") as f:
            for i in range(n):
                sample = {"messages": [
                    {"role": "user", "content": [{"type": "image", "image": f"img/{i % 64}.png"}, {"type": "text", "text": f"Sample {i}: what colour?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"<perception>Colour number {i % 64}.</perception> So that colour."}]},
                ]}  # fmt: skip
                f.write(json.dumps(sample) + "\n")
    return data


def _run(args: list, cwd: Path) -> tuple[float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "surgeon.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"surgeon {' '.join(map(str, args))} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="sample counts, comma-separated; the first is the baseline")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", default="bench/_work/data")
    args = parser.parse_args()
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    model = _model(root)
    sizes = [int(x) for x in args.sizes.split(",")]
    train = ["train", model, "--max-steps", str(args.steps), "--batch-size", "2", "--max-length", "1024", "--overwrite"]

    rows = []
    for n in sizes:
        data = _data(root, n)
        seconds, peak = _run([*train, "--data", data, "-o", root / "out"], root)
        rows.append((n, data.stat().st_size, seconds, peak))
        shutil.rmtree(root / "out", ignore_errors=True)
    base_s, base_peak = rows[0][2], rows[0][3]
    print(f"{'samples':>9} {'file MB':>8} {'wall s':>7} {'peak RSS GB':>12} {'× peak':>7} {'× wall':>7}")
    for n, size, seconds, peak in rows:
        print(f"{n:>9,} {size / 1e6:>8.1f} {seconds:>7.1f} {peak / 1e9:>12.3f} {peak / base_peak:>7.3f} {seconds / base_s:>7.2f}")

    data = _data(root, sizes[-1])
    timed = {}
    for workers in (0, 2):
        timed[workers] = _run([*train, "--data", data, "-o", root / "out", "--num-workers", str(workers)], root)
        shutil.rmtree(root / "out", ignore_errors=True)
    (s0, p0), (s2, p2) = timed[0], timed[2]
    print(f"--num-workers 2 against 0 on {sizes[-1]:,} samples: wall {s2:.1f} s vs {s0:.1f} s ({s2 / s0:.2f}×), "
          f"peak RSS of the main process {p2 / 1e9:.3f} vs {p0 / 1e9:.3f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
