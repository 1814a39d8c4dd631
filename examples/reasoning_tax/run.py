"""The reasoning-tax study: build a tiny model organism, run every surgeon method on it through the
`surgeon` commands, and measure text reasoning, perception and end-to-end accuracy.

    python examples/reasoning_tax/run.py --workdir rt/            # the study (about 20 min on 2 cores)
    python examples/reasoning_tax/run.py --workdir rt/ --quick    # a smoke run of every condition
    python examples/reasoning_tax/run.py --workdir rt/ --device cuda --size gpu

Writes rt/results.json (every run's numbers and the exact commands) and rt/results.md (the table).
What the organism is: organism.py. What each condition is: CONDITIONS below and docs/evidence.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Budget:
    """One fine-tuning budget for every trained condition (the same steps, batch and schedule)."""

    steps: int = 150
    batch: int = 16
    full_lr: float = 3e-4
    lora_lr: float = 3e-3
    lora_rank: int = 8
    sft_samples: int = 2000
    eval_samples: int = 200
    probe_steps: int = 16


BUDGETS = {
    "quick": Budget(steps=12, batch=8, sft_samples=96, eval_samples=32, probe_steps=2),
    "cpu": Budget(),
}
BUDGETS["gpu"] = Budget(
    steps=600, batch=32, full_lr=1e-4, lora_lr=1e-3, lora_rank=16, sft_samples=8000, eval_samples=500
)


@dataclass(frozen=True)
class Condition:
    """A row of the table: ``commands`` are surgeon argument lists with {vlm}, {out}, {seed} … filled
    in per run; ``seeded`` False means one run serves every seed (a deterministic command)."""

    name: str
    what: str
    commands: tuple[tuple[str, ...], ...]
    model: str = "{out}"
    seeded: bool = True
    text_only: bool = False

    @property
    def slug(self) -> str:
        """The name as a folder name and for --conditions: 'sft-full-plus-drift-gradnorm'."""
        return "-".join(
            self.name.lower().replace(",", "").replace("+", "plus").replace("λ", "lambda").split()
        )


def _args(line: str) -> tuple[str, ...]:
    return tuple(line.split())


TRAIN = _args(
    "train {vlm} --data {sft} -o {out} --max-steps {steps} --batch-size {batch} --seed {seed} --threads {threads} --overwrite"
)
FULL = (*TRAIN, *_args("--full --lr {full_lr}"))
LORA = (*TRAIN, *_args("--lora-rank {lora_rank} --lora-alpha {lora_alpha} --lr {lora_lr}"))
MERGE = _args("merge --reasoning {reasoning} --vlm {vlm} -o {out} --overwrite --method")


def _drift(scale: str, alpha: str) -> tuple[str, ...]:
    return (*FULL, "--prior", "{prior}", "--drift-scale", scale, "--drift-alpha", alpha)


def _iada(mode: str) -> tuple[tuple[str, ...], ...]:
    inject = _args(f"inject-iada {{vlm}} -o {{out}}-model --block-size {{block}} --mode {mode} --overwrite")
    return inject, tuple(a if a != "{vlm}" else "{out}-model" for a in LORA)


def _text_model(name: str, what: str, model: str) -> Condition:
    return Condition(name, what, (), model=model, seeded=False, text_only=True)


CONDITIONS = [
    _text_model("base LM", "the pretrained text LM both models start from (text only)", "{base}"),
    _text_model("reasoning LLM", "the reasoning LLM itself (text only)", "{reasoning}"),
    Condition("VLM, no SFT", "the VLM before visual SFT", (), model="{vlm}", seeded=False),
    Condition("SFT LoRA", "plain visual SFT, LoRA on attention and MLP", (LORA,)),
    Condition("SFT full", "plain visual SFT, full fine-tuning of the language model", (FULL,)),
    Condition("merge task arithmetic", "w 0.5 (no SFT)", ((*MERGE, "task-arithmetic"),), seeded=False),
    Condition("merge TIES", "w 0.5, density 0.2 (no SFT)", ((*MERGE, "ties"),), seeded=False),
    Condition(
        "merge DARE",
        "dare-linear, w 0.5, density 0.5 (no SFT)",
        ((*MERGE, "dare-linear", "--seed", "{seed}"),),
    ),
    Condition(
        "SFT full + DRIFT adaptive_cosine", "α 1 (the released recipe)", (_drift("adaptive_cosine", "1.0"),)
    ),
    Condition("SFT full + DRIFT gradnorm", "α 1", (_drift("gradnorm", "1.0"),)),
    Condition("SFT full + DRIFT absolute", "α 0.01, Δ normalised to ‖θ‖", (_drift("absolute", "0.01"),)),
    Condition("SFT LoRA + IADA", "adaptive aggregation at every layer boundary, r 4", _iada("adaptive")),
    Condition("SFT LoRA + IADA fixed", "input-independent depth weights (the ablation)", _iada("fixed")),
    Condition(
        "Image-LoRA",
        "value adapters at visual tokens of the selected heads (a quarter of the KV heads), r 8",
        (
            _args(
                "score-heads {vlm} --data {sft} -o {out}-heads.json --steps {probe_steps} --seed {seed} --overwrite"
            ),
            (*TRAIN, "--image-lora", "{out}-heads.json", "--lr", "{lora_lr}"),
        ),
    ),
    Condition(
        "SFT full, perception λ 0.5", "L = 0.5·L_p + 0.5·L_r", ((*FULL, "--perception-weight", "0.5"),)
    ),
    Condition(
        "SFT full, perception λ dynamic",
        "λ = ‖g_r‖/(‖g_p‖+‖g_r‖)",
        ((*FULL, "--perception-weight", "dynamic"),),
    ),
]


@dataclass
class Run:
    condition: str
    seed: int
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0
    text: float | None = None
    perception: float | None = None
    end_to_end: float | None = None


def _environment(threads: int, device: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _surgeon(args: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "a") as out:
        out.write("$ surgeon " + shlex.join(args) + "\n")
        out.flush()
        done = subprocess.run(
            [sys.executable, "-m", "surgeon.cli", *args], stdout=out, stderr=out, env=env
        )
    if done.returncode:
        raise SystemExit(f"Error: `surgeon {shlex.join(args)}` failed (exit {done.returncode}); see {log}")


def run_condition(
    cond: Condition, seed: int, places: dict[str, str], work: Path, device: str, threads: int
) -> Run:
    """Run one condition's commands for one seed, then evaluate what they wrote."""
    import torch

    import evaluate

    torch.set_num_threads(threads)
    slug = cond.slug
    out = work / "runs" / f"{slug}-seed{seed}"
    fill = dict(places, out=str(out), seed=str(seed), threads=str(threads))
    run, t0 = Run(cond.name, seed), time.time()
    for template in cond.commands:
        args = [a.format(**fill) for a in template]
        run.commands.append("surgeon " + shlex.join(args))
        _surgeon(args, _environment(threads, device), work / "runs" / f"{slug}-seed{seed}.log")
    data = Path(places["data"])
    folder = cond.model.format(**fill)
    model = evaluate.load(folder, device)
    processor = _processor(folder if cond.text_only else places["vlm"], cond.text_only)
    run.text = evaluate.text_accuracy(model, processor, data / "eval-text.jsonl")
    if not cond.text_only:
        run.perception, run.end_to_end = evaluate.visual_accuracy(
            model, processor, data / "eval-visual.jsonl"
        )
    run.seconds = round(time.time() - t0, 1)
    return run


def _processor(vlm: str, text_only: bool):
    from transformers import AutoProcessor, AutoTokenizer

    return AutoTokenizer.from_pretrained(vlm) if text_only else AutoProcessor.from_pretrained(vlm)


def prepare(work: Path, size: str, budget: Budget, device: str, log) -> dict[str, str]:
    """The organism and the data sets (built once per work folder), and the DRIFT prior."""
    import organism

    marker = work / "organism" / "done.json"
    if not marker.exists():
        log(f"building the organism ({size})")
        t0 = time.time()
        paths = organism.build(work / "organism", organism.SIZES[size], device, log)
        data = work / "organism" / "data"
        k = organism.visual_problem
        organism.write_visual_set(data, "sft", budget.sft_samples, 10, lambda r, p: k(r, p, r.randint(1, 2)))
        organism.write_visual_set(
            data, "eval-visual", budget.eval_samples, 11, lambda r, p: k(r, p, r.randint(1, 2))
        )
        half = budget.eval_samples // 2
        organism.write_jsonl(
            data / "eval-text.jsonl",
            organism.text_set(half, 12, {2: 1}) + organism.text_set(half, 13, {3: 1}),
        )
        marker.write_text(
            json.dumps({k: str(v) for k, v in paths.items()} | {"seconds": round(time.time() - t0)})
        )
    paths = json.loads(marker.read_text())
    sizes = organism.SIZES[size]
    places = {
        "vlm": paths["vlm"], "reasoning": paths["reasoning"], "base": paths["base"], "data": str(work / "organism" / "data"),
        "sft": str(work / "organism" / "data" / "sft.jsonl"), "prior": str(work / "prior"),
        "steps": str(budget.steps), "batch": str(budget.batch), "full_lr": str(budget.full_lr),
        "lora_lr": str(budget.lora_lr), "lora_rank": str(budget.lora_rank), "lora_alpha": str(2 * budget.lora_rank),
        "probe_steps": str(budget.probe_steps), "block": "1" if sizes.layers <= 4 else str(sizes.layers // 4),
    }  # fmt: skip
    (work / "runs").mkdir(exist_ok=True)
    prior = [
        "prior",
        "--reasoning",
        places["reasoning"],
        "--vlm",
        places["vlm"],
        "-o",
        places["prior"],
        "--overwrite",
    ]
    _surgeon(prior, _environment(2, device), work / "runs" / "prior.log")
    return places


def summarise(runs: list[Run]) -> list[dict]:
    rows = []
    for cond in CONDITIONS:
        mine = [r for r in runs if r.condition == cond.name]
        if not mine:
            continue
        row = {"condition": cond.name, "what": cond.what, "runs": len(mine) if cond.seeded else 1}
        for metric in ("text", "perception", "end_to_end"):
            values = [getattr(r, metric) for r in mine if getattr(r, metric) is not None]
            if values:
                row[metric] = statistics.fmean(values)
                row[metric + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
                row[metric + "_n"] = len(values)
        rows.append(row)
    return rows


def beyond_noise(row: dict, ref: dict, metric: str) -> bool | None:
    """|mean difference| > 2 standard deviations of the difference of the two means; None when
    neither row varies with the seed (deterministic commands: no estimate of the noise)."""
    if metric not in row or metric not in ref:
        return None
    sd = (
        row[metric + "_sd"] ** 2 / row[metric + "_n"] + ref[metric + "_sd"] ** 2 / ref[metric + "_n"]
    ) ** 0.5
    if sd == 0 and row["runs"] == 1 and ref["runs"] == 1:
        return None
    return abs(row[metric] - ref[metric]) > 2 * sd


def table(rows: list[dict]) -> str:
    """Markdown: mean ± sd in %, and the change against the plain SFT run of the same kind."""
    by = {r["condition"]: r for r in rows}

    def cell(row: dict, metric: str) -> str:
        if metric not in row:
            return "–"
        text = f"{100 * row[metric]:.1f} ± {100 * row[metric + '_sd']:.1f}"
        ref = by.get(_reference(row["condition"]))
        if ref is not None and ref is not row and metric in ref:
            text += (
                f" ({100 * (row[metric] - ref[metric]):+.1f}){'**' if beyond_noise(row, ref, metric) else ''}"
            )
        return text

    lines = [
        "| condition | runs | text reasoning % | perception % | end to end % |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = " | ".join(cell(row, m) for m in ("text", "perception", "end_to_end"))
        lines.append(f"| {row['condition']} | {row['runs']} | {cells} |")
    return "\n".join(lines)


def _reference(name: str) -> str:
    """The row a condition is compared with: LoRA-based rows with SFT LoRA, full-based ones with
    SFT full, merges with the VLM before SFT."""
    if name.startswith("merge"):
        return "VLM, no SFT"
    if "LoRA" in name:
        return "SFT LoRA"
    if name.startswith("SFT full") and name != "SFT full":
        return "SFT full"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument(
        "--quick", action="store_true", help="the quick size and budget, one seed: a smoke run"
    )
    parser.add_argument(
        "--size", choices=["quick", "cpu", "gpu"], help="organism size (default: cpu, gpu with --device cuda)"
    )
    parser.add_argument("--seeds", type=int, help="seeds per trained condition (default 3, 1 with --quick)")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda: where the organism and every command run"
    )
    parser.add_argument("--jobs", type=int, help="runs at once (default: 2 on a CPU, 1 on a GPU)")
    parser.add_argument(
        "--conditions", help="comma-separated condition slugs, e.g. sft-full,merge-ties (default: all)"
    )
    parser.add_argument(
        "--render", action="store_true", help="only print the table of WORKDIR/results.json again"
    )
    args = parser.parse_args(argv)
    if args.render:
        if not (args.workdir / "results.json").is_file():
            print(
                f"Error: {args.workdir / 'results.json'} does not exist; run the study first", file=sys.stderr
            )
            return 2
        saved = json.loads((args.workdir / "results.json").read_text())
        rows = summarise([Run(**r) for r in saved["runs"]])
        (args.workdir / "results.md").write_text(table(rows) + "\n")
        print(table(rows))
        return 0

    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            print(f"Error: --device {args.device}: no such device here; use --device cpu", file=sys.stderr)
            return 2
    size = args.size or ("quick" if args.quick else "gpu" if args.device.startswith("cuda") else "cpu")
    budget = BUDGETS[size]
    seeds = args.seeds or (1 if args.quick else 3)
    jobs = args.jobs or (1 if args.device.startswith("cuda") else 2)
    threads = max(1, (os.cpu_count() or 2) // jobs)
    wanted = args.conditions.split(",") if args.conditions else [c.slug for c in CONDITIONS]
    chosen = [c for c in CONDITIONS if c.slug in wanted]
    if unknown := sorted(set(wanted) - {c.slug for c in CONDITIONS}):
        names = ", ".join(c.slug for c in CONDITIONS)
        print(f"Error: --conditions: no condition {', '.join(unknown)}; choose from {names}", file=sys.stderr)
        return 2
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    places = prepare(work, size, budget, args.device, log)
    log(
        f"organism ready ({time.time() - t0:.0f} s); running {len(chosen)} conditions × {seeds} seed(s), {jobs} at once"
    )
    tasks = [(c, s) for c in chosen for s in (range(seeds) if c.seeded else [0])]
    runs: list[Run] = []
    ctx = __import__("multiprocessing").get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        futures = [pool.submit(run_condition, c, s, places, work, args.device, threads) for c, s in tasks]
        for future in as_completed(futures):
            run = future.result()
            runs.append(run)
            log(f"  {run.condition} seed {run.seed}: text {run.text} perception {run.perception} "
                f"end-to-end {run.end_to_end} ({run.seconds} s)")  # fmt: skip
    runs.sort(key=lambda r: ([c.name for c in CONDITIONS].index(r.condition), r.seed))
    rows = summarise(runs)
    organism_info = json.loads((work / "organism" / "done.json").read_text())
    result = {
        "command": "python examples/reasoning_tax/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "size": size, "budget": asdict(budget), "seeds": seeds, "jobs": jobs, "device": args.device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "organism_seconds": organism_info["seconds"], "seconds": round(time.time() - t0),
        "rows": rows, "runs": [asdict(r) for r in runs],
    }  # fmt: skip
    (work / "results.json").write_text(json.dumps(result, indent=1))
    (work / "results.md").write_text(table(rows) + "\n")
    print(table(rows))
    log(f"done in {time.time() - t0:.0f} s: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
