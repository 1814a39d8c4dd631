"""Speed and memory of ``surgeon prior`` and ``surgeon merge`` against the I/O floor and a
reference-style script, on random checkpoints of real shapes (a benchmark, not a test).

    python bench/prior_merge.py                      # Qwen2.5-1.5B-shaped pair, all cases
    python bench/prior_merge.py --size 7b --no-reference          # 7B-shaped pair (~32 GB of inputs)

Builds, under ``--work`` (default ``bench/_work``, git-ignored), a text LLM of Qwen2 shapes and a
Qwen2.5-VL with the same language-model shapes plus a vision tower of the real model's size, both
random bf16 (N(0, 0.02) values, norms 1) written straight to disk block by block (no model is
instantiated; tensor names and shapes come from transformers on the meta device). Then runs each case in its own
subprocess and reads that child's wall time and peak RSS (``os.wait4`` → ``ru_maxrss``):

    startup          python -c "import torch, surgeon…": the fixed cost of any torch-based tool
    floor-prior      read exactly the tensors ``surgeon prior`` reads (both inputs' attn+mlp, one
                     at a time, ``readinto`` a reused buffer), write the same number of bytes, fsync
    surgeon-prior    surgeon prior --reasoning LLM --vlm VLM -o OUT              (default attn,mlp)
    reference-prior  load both models whole with transformers, subtract attn+mlp, save_file, fsync
    floor-merge      read both inputs fully, write the VLM's size, fsync
    surgeon-merge    surgeon merge --method task-arithmetic
    surgeon-ties     surgeon merge --method ties (reported against task arithmetic, same run)
    reference-merge  load both whole, θ_V += w·(θ_R − θ_V) in place, save_pretrained, fsync

Page cache: by default every case starts warm — the parent reads every input file once right
before the case (so each case finds the same inputs cached, as far as RAM allows); ``--cold``
instead evicts the inputs with ``posix_fadvise(DONTNEED)`` before each case. Outputs are deleted
and ``sync`` is called between cases. ``--repeat N`` runs every case N times (rounds in turn) and
keeps the fastest run, the least disturbed by other load on the machine. Results: a table with
time and RSS ratios against the floor and the reference (also without the start-up), and
``<work>/results-<size>-<cache>.json``. ``--clean`` deletes the models afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    # Qwen2-1.5B language model (tied embeddings), Qwen2.5-VL vision tower
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # Qwen2-7B language model (separate lm_head), as in Qwen2.5-VL-7B / R1-Distill-Qwen-7B
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
BUF = 64 << 20
POOL = 1 << 25  # random bf16 values the models are cut from (64 MB)


# ---------------------------------------------------------------- building the random checkpoints


def _configs(size: str) -> tuple[object, object]:
    from transformers import Qwen2_5_VLConfig, Qwen2Config

    text = dict(SIZES[size], max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
    llm = Qwen2Config(**text, dtype="bfloat16")
    vlm = Qwen2_5_VLConfig(
        text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(VISION, out_hidden_size=text["hidden_size"]),
        tie_word_embeddings=text["tie_word_embeddings"], dtype="bfloat16",
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )  # fmt: skip
    return llm, vlm


def _specs(config: object, causal_lm: bool) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes as transformers saves the model (meta device: nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if causal_lm else AutoModelForImageTextToText
    with torch.device("meta"):
        model = auto.from_config(config)
    state = model.state_dict()
    if config.get_text_config().tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return [(n, tuple(t.shape)) for n, t in state.items()]


def build(folder: Path, config: object, causal_lm: bool, seed: int) -> None:
    import torch

    from surgeon.io.streaming import row_blocks
    from surgeon.io.output import ShardedWriter, TensorSpec, output_folder

    if (folder / "config.json").exists():
        print(f"using {folder}")
        return
    specs = _specs(config, causal_lm)
    # A pool of N(0, 0.02) values, cut at shifting offsets: realistic values at disk speed
    # (drawing every number anew would take minutes for a 7B pair and measure nothing more).
    pool = torch.empty(POOL, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    offset = 0
    start = time.perf_counter()
    with output_folder(folder, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        with ShardedWriter(tmp, [TensorSpec(n, "BF16", s) for n, s in specs], shard_size=4 * 10**9) as w:
            for name, shape in specs:
                for a, b in row_blocks(shape):
                    n = (b - a) * math.prod(shape[1:])
                    offset = (offset + 7919) % (POOL - n)
                    block = pool[offset : offset + n].view((b - a, *shape[1:]))
                    w.write_rows(name, a, torch.ones_like(block) if "norm" in name else block)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"built {folder} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------- the cases' child processes


def floor(plan_path: str, out_dir: str) -> None:
    """Read the planned byte ranges one tensor at a time into a reused buffer; write as many bytes."""
    plan = json.loads(Path(plan_path).read_text())
    buf = bytearray(BUF)
    view = memoryview(buf)
    handles: dict[str, object] = {}
    for file, start, length in plan["reads"]:
        f = handles.get(file) or handles.setdefault(file, open(file, "rb"))
        f.seek(start)
        while length:
            n = f.readinto(view[: min(length, BUF)])
            length -= n
    out = Path(out_dir)
    out.mkdir()
    with open(out / "out.bin", "wb") as f:
        left = plan["write_bytes"]
        while left:
            n = min(left, BUF)
            f.write(view[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def _load(vlm: str, llm: str) -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return (
        AutoModelForImageTextToText.from_pretrained(vlm, dtype=torch.bfloat16),
        AutoModelForCausalLM.from_pretrained(llm, dtype=torch.bfloat16),
    )


def _vlm_name(llm_name: str) -> str:
    return llm_name.replace("model.", "model.language_model.", 1)


def reference_prior(vlm: str, llm: str, out_dir: str) -> None:
    """Load both whole, Δ = θ_R − θ_V for every attn/mlp weight kept in memory, save, fsync."""
    import re

    import torch
    from safetensors.torch import save_file

    v, r = _load(vlm, llm)
    vparams = dict(v.named_parameters())
    deltas = {}
    with torch.no_grad():
        for name, p in r.named_parameters():
            if re.search(r"\.(mlp|self_attn)\.", name) and _vlm_name(name) in vparams:
                deltas[_vlm_name(name)] = (p - vparams[_vlm_name(name)]).contiguous()
    out = Path(out_dir)
    out.mkdir()
    save_file(deltas, str(out / "model.safetensors"))
    _fsync_folder(out)


def reference_merge(vlm: str, llm: str, out_dir: str) -> None:
    """Load both whole, θ_V += 0.5·(θ_R − θ_V) for every paired LM parameter, save_pretrained, fsync."""
    import torch

    v, r = _load(vlm, llm)
    vparams = dict(v.named_parameters())
    with torch.no_grad():
        for name, p in r.named_parameters():
            target = vparams.get(_vlm_name(name), vparams.get(name))
            if target is not None and target.shape == p.shape:
                target.add_(0.5 * (p - target))
    v.save_pretrained(out_dir)
    _fsync_folder(Path(out_dir))


def _fsync_folder(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb+") as h:
            os.fsync(h.fileno())


# ---------------------------------------------------------------- measuring


def _plan(work: Path, out_bytes: int, names: dict[str, list[str]] | None) -> Path:
    """Byte ranges to read: the named tensors of each model (all when ``names`` is None)."""
    from surgeon.hub.sources import open_checkpoint

    reads = []
    for model in ("vlm", "llm"):
        with open_checkpoint(work / model) as ckpt:
            wanted = ckpt.tensors if names is None else names[model]
            for n in wanted:
                info = ckpt.tensors[n]
                reads.append([str(ckpt.path / info.file), info.start, info.nbytes])
    path = work / f"plan-{len(reads)}-{out_bytes}.json"
    path.write_text(json.dumps({"reads": reads, "write_bytes": out_bytes}))
    return path


def _input_files(work: Path) -> list[Path]:
    return sorted((work / "vlm").glob("*.safetensors")) + sorted((work / "llm").glob("*.safetensors"))


def _prepare_cache(work: Path, cold: bool) -> None:
    buf = bytearray(BUF)
    for path in _input_files(work):
        with open(path, "rb") as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.readinto(buf):
                    pass


# The child's peak RSS must not include this (large) process: a vfork'd child is charged its
# parent's high-water mark until it execs. So each case is started by a bare interpreter that
# imports nothing heavy, and that launcher reports the case's own wall time and ru_maxrss.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - start, "maxrss_kb": usage.ru_maxrss,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def run_case(cmd: list[str], work: Path, out: Path, cold: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    _prepare_cache(work, cold)
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"case failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if r["code"] != 0:
        raise SystemExit(f"case failed (exit {r['code']}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return {"seconds": r["seconds"], "peak_rss_mb": r["maxrss_kb"] / 1024, "written_gb": written / 1e9}


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def measure(work: Path, size: str, cold: bool, reference: bool, repeat: int, only: set[str] | None = None) -> dict:
    from surgeon.anatomy.align import align
    from surgeon.hub.sources import open_checkpoint
    from surgeon.anatomy.families import Selection

    vlm, llm, out = work / "vlm", work / "llm", work / "out"
    with open_checkpoint(vlm) as v, open_checkpoint(llm) as r:
        pairs = align(v, r).select(Selection())
        prior_names = {"vlm": [p.vlm_name for p in pairs], "llm": [p.llm_name for p in pairs]}
        prior_bytes = sum(v.tensors[p.vlm_name].nbytes for p in pairs)
        vlm_bytes = sum(i.nbytes for i in v.tensors.values())
        input_bytes = vlm_bytes + sum(i.nbytes for i in r.tensors.values())
    me = [sys.executable, __file__]
    cli = [sys.executable, "-c", "from surgeon.cli import main; main()", "-q"]
    cases = {
        "startup": [sys.executable, "-c", "import torch, surgeon.cli, surgeon.drift.prior, surgeon.merge.engine"],
        "floor-prior": me + ["_floor", str(_plan(work, prior_bytes, prior_names)), str(out)],
        "surgeon-prior": cli + ["prior", "--reasoning", str(llm), "--vlm", str(vlm), "-o", str(out)],
        "reference-prior": me + ["_reference_prior", str(vlm), str(llm), str(out)],
        "floor-merge": me + ["_floor", str(_plan(work, vlm_bytes, None)), str(out)],
        "surgeon-merge": cli + ["merge", "--reasoning", str(llm), "--vlm", str(vlm), "-o", str(out), "--method", "task-arithmetic"],
        "surgeon-ties": cli + ["merge", "--reasoning", str(llm), "--vlm", str(vlm), "-o", str(out), "--method", "ties"],
        "reference-merge": me + ["_reference_merge", str(vlm), str(llm), str(out)],
    }
    runs: dict[str, list[dict]] = {}
    for round_ in range(1, repeat + 1):
        for name, cmd in cases.items():
            if (name.startswith("reference") and not reference) or (only and name not in only):
                continue
            if name.startswith("reference") and _mem_available_gb() < 1.6 * input_bytes / 2**30:
                print(f"{name}: skipped, only {_mem_available_gb():.1f} GiB of memory available")
                continue
            r = run_case(cmd, work, out, cold)
            runs.setdefault(name, []).append(r)
            print(f"[{round_}/{repeat}] {name:16s} {r['seconds']:7.1f} s  {r['peak_rss_mb']:8.0f} MB peak RSS  wrote {r['written_gb']:.2f} GB", flush=True)
    # the fastest run of each case (least disturbed by other load), and the highest peak RSS seen
    results = {
        name: {"seconds": min(x["seconds"] for x in rs), "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
               "written_gb": rs[0]["written_gb"], "runs": [x["seconds"] for x in rs]}
        for name, rs in runs.items()
    }  # fmt: skip
    return {
        "size": size,
        "cache": "cold" if cold else "warm",
        "input_gb": input_bytes / 1e9,
        "repeat": repeat,
        "prior_selected_read_gb": 2 * prior_bytes / 1e9,
        "cases": results,
    }


def report(data: dict) -> None:
    c = data["cases"]
    start = c.get("startup", {}).get("seconds", 0.0)
    print(f"\n{data['size']} pair, {data['input_gb']:.2f} GB of inputs, {data['cache']} page cache, best of {data['repeat']}")
    print(f"start-up (python + import torch + surgeon): {start:.1f} s, {c.get('startup', {}).get('peak_rss_mb', 0):.0f} MB")
    head = ("command", "time", "floor", "×floor", "×floor*", "ref", "×ref", "peak RSS", "floor", "ref")
    print("{:8s} {:>7s} {:>7s} {:>7s} {:>8s} {:>7s} {:>6s} {:>9s} {:>7s} {:>8s}".format(*head))
    for cmd in ("prior", "merge"):
        s, f, r = c.get(f"surgeon-{cmd}"), c.get(f"floor-{cmd}"), c.get(f"reference-{cmd}")
        if not s or not f:
            continue
        print(
            f"{cmd:8s} {s['seconds']:6.1f}s {f['seconds']:6.1f}s {s['seconds'] / f['seconds']:7.2f} "
            f"{(s['seconds'] - start) / f['seconds']:8.2f} "
            + (f"{r['seconds']:6.1f}s {s['seconds'] / r['seconds']:6.2f} " if r else f"{'-':>7s} {'-':>6s} ")
            + f"{s['peak_rss_mb']:7.0f}MB {f['peak_rss_mb']:5.0f}MB "
            + (f"{r['peak_rss_mb']:6.0f}MB" if r else f"{'-':>8s}")
        )
    print("×floor*: surgeon's time less the start-up, over the floor's")
    t, m = c.get("surgeon-ties"), c.get("surgeon-merge")
    if t and m:
        print(f"TIES: {t['seconds']:.1f} s, {t['seconds'] / m['seconds']:.2f}× task arithmetic's time "
              f"(median of rounds {sorted(t['runs'])[len(t['runs']) // 2] / sorted(m['runs'])[len(m['runs']) // 2]:.2f}×), "
              f"peak RSS {t['peak_rss_mb']:.0f} MB")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        {"_floor": floor, "_reference_prior": reference_prior, "_reference_merge": reference_merge}[sys.argv[1]](*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1.5b")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work")
    ap.add_argument("--cold", action="store_true", help="evict inputs from the page cache before each case")
    ap.add_argument("--no-reference", dest="reference", action="store_false", help="skip the load-everything scripts")
    ap.add_argument("--repeat", type=int, default=1, help="run every case this many times; report the fastest")
    ap.add_argument("--clean", action="store_true", help="delete the random checkpoints afterwards")
    ap.add_argument("--cases", default=None, help="comma-separated case names to run (default: all)")
    args = ap.parse_args()
    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    llm_cfg, vlm_cfg = _configs(args.size)
    build(work / "llm", llm_cfg, causal_lm=True, seed=1)
    build(work / "vlm", vlm_cfg, causal_lm=False, seed=0)
    data = measure(work, args.size, args.cold, args.reference, args.repeat, set(args.cases.split(",")) if args.cases else None)
    data["machine"] = {"cpus": os.cpu_count(), "mem_gb": round(_mem_total_gb(), 1)}
    (args.work / f"results-{args.size}-{data['cache']}.json").write_text(json.dumps(data, indent=2))
    report(data)
    if args.clean:
        shutil.rmtree(work)


def _mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


if __name__ == "__main__":
    main()
