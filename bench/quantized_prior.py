"""``surgeon prior`` on an FP8 pair against the I/O floor of that pair (a benchmark, not a test).

    python bench/quantized_prior.py               # Qwen2.5-1.5B-shaped pair, 3 rounds

Builds (under ``--work``, default ``bench/_work``) the random bf16 Qwen2.5-1.5B-shaped pair of
``bench/prior_merge.py`` and an FP8 copy of each, as DeepSeek-V3 and Qwen3-FP8 ship them: every
decoder-layer projection in float8_e4m3fn with one ``weight_scale_inv`` per 128×128 block,
embeddings, norms and the vision tower as stored, ``quantization_config`` in config.json. Then, in
alternating rounds, each in its own process (as ``prior_merge.py`` runs its cases, warm cache):

    floor-fp8      read exactly what the FP8 prior must read (both inputs' attn+mlp values and
                   their scales), write the prior's bytes (bf16 Δ), fsync
    surgeon-fp8    surgeon prior --reasoning LLM-FP8 --vlm VLM-FP8 -o OUT (dequantised, bf16 Δ)
    floor-bf16     the same for the bf16 pair
    surgeon-bf16   surgeon prior on the bf16 pair

Reports medians of ``--rounds`` rounds and the ratios surgeon/floor for each pair.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prior_merge  # noqa: E402 - the pair builder and the case runner

ROOT = Path(__file__).resolve().parents[1]
BLOCK = (128, 128)


def to_fp8(src: Path, dst: Path) -> None:
    """An FP8 block copy of ``src``, one tensor at a time."""
    import torch

    from surgeon.hub.sources import open_checkpoint
    from surgeon.io.output import ShardedWriter, TensorSpec, output_folder
    from surgeon.io.quantized import Grid
    from surgeon.io.requantize import quantize_fp8

    if (dst / "config.json").exists():
        print(f"using {dst}")
        return
    with open_checkpoint(src) as ckpt, output_folder(dst, overwrite=True) as tmp:
        config = dict(ckpt.config, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        chosen = {n for n, i in ckpt.tensors.items() if len(i.shape) == 2 and ".layers." in n and n.endswith("_proj.weight") and "visual" not in n}
        specs = []
        for name, info in ckpt.tensors.items():
            if name in chosen:
                specs += [TensorSpec(name, "F8_E4M3", info.shape), TensorSpec(name + "_scale_inv", "F32", Grid(*BLOCK).shape(*info.shape))]
            else:
                specs.append(TensorSpec(name, info.dtype, info.shape))
        with ShardedWriter(tmp, specs, shard_size=4 * 10**9) as writer:
            for name, info in ckpt.tensors.items():
                w = ckpt.read(name)
                if name in chosen:
                    q, scale = quantize_fp8(w.float(), Grid(*BLOCK), tuple(info.shape), torch.float8_e4m3fn)
                    writer.write(name, q)
                    writer.write(name + "_scale_inv", scale)
                else:
                    writer.write(name, w)
    print(f"built {dst}")


def _plan(vlm: Path, llm: Path, out_bytes: int, tag: str) -> Path:
    from surgeon.anatomy.align import align
    from surgeon.anatomy.families import Selection
    from surgeon.hub.sources import open_checkpoint

    reads = []
    with open_checkpoint(vlm) as v, open_checkpoint(llm) as r:
        for pair in align(v, r).select(Selection()):
            for ckpt, name in ((v, pair.vlm_name), (r, pair.llm_name)):
                for part in (name, name + "_scale_inv"):
                    if part in ckpt.tensors:
                        info = ckpt.tensors[part]
                        reads.append([str(ckpt.path / info.file), info.start, info.nbytes])
    path = vlm.parent / f"plan-prior-{tag}.json"
    path.write_text(json.dumps({"reads": reads, "write_bytes": out_bytes}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work, fp8 = args.work / "1.5b", args.work / "1.5b" / "fp8"  # the bf16 pair is prior_merge.py's
    llm_config, vlm_config = prior_merge._configs("1.5b")
    prior_merge.build(work / "vlm", vlm_config, causal_lm=False, seed=0)
    prior_merge.build(work / "llm", llm_config, causal_lm=True, seed=1)
    to_fp8(work / "vlm", fp8 / "vlm")
    to_fp8(work / "llm", fp8 / "llm")
    from surgeon.anatomy.align import align
    from surgeon.anatomy.families import Selection
    from surgeon.hub.sources import open_checkpoint

    with open_checkpoint(work / "vlm") as v, open_checkpoint(work / "llm") as r:
        out_bytes = sum(v.tensors[p.vlm_name].nbytes for p in align(v, r).select(Selection()))
    me, out = [sys.executable, str(Path(prior_merge.__file__))], work / "out"
    cli = [sys.executable, "-c", "from surgeon.cli import main; main()", "-q"]
    cases = {}
    pairs = {"fp8": fp8, "bf16": work}
    for tag, pair in pairs.items():
        vlm, llm = pair / "vlm", pair / "llm"
        cases[f"floor-{tag}"] = me + ["_floor", str(_plan(vlm, llm, out_bytes, tag)), str(out)]
        cases[f"surgeon-{tag}"] = cli + ["prior", "--reasoning", str(llm), "--vlm", str(vlm), "-o", str(out)]
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for round_ in range(1, args.rounds + 1):
        for name, cmd in cases.items():
            r = prior_merge.run_case(cmd, pairs[name.split("-")[1]], out, cold=False)  # its own pair's files warmed
            runs[name].append(r)
            print(f"[{round_}/{args.rounds}] {name:13s} {r['seconds']:6.1f} s  {r['peak_rss_mb']:6.0f} MB peak RSS", flush=True)
    med = {n: {"seconds": statistics.median(x["seconds"] for x in rs), "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs)} for n, rs in runs.items()}
    ratios = {f"surgeon/floor {tag}": med[f"surgeon-{tag}"]["seconds"] / med[f"floor-{tag}"]["seconds"] for tag in ("fp8", "bf16")}
    ratios["surgeon fp8/bf16"] = med["surgeon-fp8"]["seconds"] / med["surgeon-bf16"]["seconds"]
    print(f"medians of {args.rounds} rounds (Qwen2.5-1.5B-shaped pair, warm cache):")
    for name, m in med.items():
        print(f"  {name:13s} {m['seconds']:6.1f} s  {m['peak_rss_mb']:6.0f} MB peak RSS")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}×")
    (work / "quantized-prior.json").write_text(json.dumps({"medians": med, "ratios": ratios, "runs": runs}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        prior_merge.floor(sys.argv[2], sys.argv[3])
    else:
        main()
