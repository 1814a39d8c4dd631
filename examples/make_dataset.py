"""Write the synthetic VLM dataset surgeon's tests, demo and benchmarks use (``surgeon.demo.synthetic``).

Rendered shapes and bar charts with questions, and chain-of-thought answers whose perception part
is tagged ``<perception>…</perception>``, in TRL, ShareGPT or LLaMA-Factory JSONL. Run:

    python examples/make_dataset.py OUT_DIR [--n 48] [--seed 0] [--fmt trl|sharegpt|llamafactory]
    surgeon diagnose OUT_DIR/data.jsonl --model ./surgeon-demo/vlm
"""

from __future__ import annotations

import argparse
from pathlib import Path

from surgeon.demo.synthetic import FORMATS, make_dataset


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmt", choices=FORMATS, default="trl")
    args = parser.parse_args(argv)
    path = make_dataset(args.out_dir, args.n, args.seed, args.fmt)
    print(f"wrote {args.n} samples to {path}")
    return path


if __name__ == "__main__":
    main()
