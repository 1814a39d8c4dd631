"""The reasoning-tax study: build tiny model organisms at two depths, run every surgeon method on
them through the `surgeon` commands, and score text reasoning, perception and end-to-end accuracy
with `surgeon eval`'s own scorer (confidence intervals and paired tests as `surgeon eval` reports).

    python examples/reasoning_tax/run.py --workdir rt/                  # 4 and 8 layers, 3 seeds (2 cores)
    python examples/reasoning_tax/run.py --workdir rt/ --quick          # every condition at smoke sizes, 1 seed
    python examples/reasoning_tax/run.py --workdir rt/ --device cuda    # 8 and 16 layers, width 512, on a GPU

Writes rt/results.json (every run's numbers, per-item correctness and exact commands), rt/results.md
(the tables) and rt/figures/*.png (one picture per question). What the organism is: organism.py.
What each condition is: CONDITIONS below and docs/evidence.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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
    """One fine-tuning budget for every trained condition (the same steps, batch and schedule), and
    the sizes of the data sets and of the steps that prepare the study (probe, format training)."""

    steps: int = 150
    batch: int = 16
    full_lr: float = 3e-4
    lora_lr: float = 3e-3
    lora_rank: int = 8
    sft_samples: int = 2000
    eval_samples: int = 200
    probe_steps: int = 16
    probe_rows: int = 48
    format_steps: int = 100


BUDGETS = {
    "quick": Budget(steps=12, batch=8, sft_samples=96, eval_samples=32, probe_steps=2, probe_rows=8, format_steps=8),
    "cpu": Budget(),
    "gpu": Budget(steps=600, batch=32, full_lr=1e-4, lora_lr=1e-3, lora_rank=16, sft_samples=8000, eval_samples=500, format_steps=300),
}
SIZE_SETS = {"quick": ("quick", "quick-deep"), "cpu": ("small", "deep"), "gpu": ("gpu", "gpu-deep")}
# What the default CPU study runs at each size, to finish in about 50 minutes on 2 cores (--all: every
# condition at every size, about 2 hours): at 4 layers everything but five variants the first study
# already measured on the same organism; at 8 layers the tax and the methods whose effect could depend
# on depth (DRIFT, DRIFT on the probed layers, IADA, merging before and after SFT).
REPEATED = {"merge-dare", "sft-full-plus-drift-gradnorm", "sft-full-plus-drift-absolute", "sft-lora-plus-iada-fixed", "sft-full-perception-lambda-dynamic"}
DEEP = {"base-lm", "reasoning-llm", "vlm-no-sft", "sft-lora", "sft-full", "merge-task-arithmetic", "sft-full-plus-drift-adaptive_cosine",
        "sft-full-plus-drift-on-probed-layers", "sft-lora-plus-iada", "merge-task-arithmetic-after-sft"}  # fmt: skip
OLD_COLOURS, NEW_COLOURS = ("red", "green"), ("blue", "yellow")  # the new-content setting (Image-LoRA)


@dataclass(frozen=True)
class Condition:
    """A row of the table: ``commands`` are surgeon argument lists with {vlm}, {out}, {seed} … filled
    in per run; ``seeded`` False means one run serves every seed (a deterministic command);
    ``setting`` "new" runs on the format-trained VLM and the new colours; ``wave`` 2 runs after every
    wave-1 run (it reads their outputs, e.g. {sft_run}: SFT full of the same seed)."""

    name: str
    what: str
    commands: tuple[tuple[str, ...], ...]
    model: str = "{out}"
    seeded: bool = True
    text_only: bool = False
    setting: str = "main"
    wave: int = 1
    reference: str = ""  # the row it is compared with (paired tests, Δ columns)

    @property
    def slug(self) -> str:
        """The name as a folder name and for --conditions: 'sft-full-plus-drift-gradnorm'."""
        name = self.name.lower().replace(",", "").replace(":", "").replace("+", "plus").replace("λ", "lambda")
        return "-".join(name.split())


def _args(line: str) -> tuple[str, ...]:
    return tuple(line.split())


TRAIN = _args(
    "train {vlm} --data {sft} -o {out} --max-steps {steps} --batch-size {batch} --seed {seed} --threads {threads} --overwrite"
)
FULL = (*TRAIN, *_args("--full --lr {full_lr}"))
LORA = (*TRAIN, *_args("--lora-rank {lora_rank} --lora-alpha {lora_alpha} --lr {lora_lr}"))
MERGE = _args("merge --reasoning {reasoning} --vlm {vlm} -o {out} --overwrite --method")
AFTER = _args("merge --reasoning {reasoning} --vlm {sft_run} -o {out} --overwrite --method")


def _drift(scale: str, alpha: str, prior: str = "{prior}") -> tuple[str, ...]:
    return (*FULL, "--prior", prior, "--drift-scale", scale, "--drift-alpha", alpha)


def _iada(mode: str) -> tuple[tuple[str, ...], ...]:
    inject = _args(f"inject-iada {{vlm}} -o {{out}}-model --block-size {{block}} --mode {mode} --overwrite")
    return inject, tuple(a if a != "{vlm}" else "{out}-model" for a in LORA)


def _text_model(name: str, what: str, model: str) -> Condition:
    return Condition(name, what, (), model=model, seeded=False, text_only=True)


IMAGE_LORA = (
    _args("score-heads {vlm} --data {sft} -o {out}-heads.json --steps {probe_steps} --seed {seed} --overwrite"),
    (*TRAIN, "--image-lora", "{out}-heads.json", "--lr", "{lora_lr}"),
)
NO_SFT, SFT_LORA, SFT_FULL, NEW_BASE, NEW_LORA = "VLM, no SFT", "SFT LoRA", "SFT full", "new colours: VLM, no SFT", "new colours: SFT LoRA"

CONDITIONS = [
    _text_model("base LM", "the pretrained text LM both models start from (text only)", "{base}"),
    _text_model("reasoning LLM", "the reasoning LLM itself (text only)", "{reasoning}"),
    Condition(NO_SFT, "the VLM before visual SFT", (), model="{vlm}", seeded=False),
    Condition(SFT_LORA, "plain visual SFT, LoRA on attention and MLP", (LORA,), reference=NO_SFT),
    Condition(SFT_FULL, "plain visual SFT, full fine-tuning of the language model", (FULL,), reference=NO_SFT),
    Condition("SFT full, packed", "the same with --packing (the study's own check: same numbers within noise)", ((*FULL, "--packing"),), reference=SFT_FULL),
    Condition("SFT full, attn_proj only", "full fine-tuning of the attention projections only (--modules attn_proj)", ((*FULL, "--modules", "attn_proj"),), reference=SFT_FULL),
    Condition("SFT full, gate_up only", "full fine-tuning of the MLP gate/up projections only (--modules gate_up)", ((*FULL, "--modules", "gate_up"),), reference=SFT_FULL),
    Condition("merge task arithmetic", "w 0.5, before SFT", ((*MERGE, "task-arithmetic"),), seeded=False, reference=NO_SFT),
    Condition("merge TIES", "w 0.5, density 0.2, before SFT", ((*MERGE, "ties"),), seeded=False, reference=NO_SFT),
    Condition("merge DARE", "dare-linear, w 0.5, density 0.5, before SFT", ((*MERGE, "dare-linear", "--seed", "{seed}"),), reference=NO_SFT),
    Condition("merge task arithmetic after SFT", "the reasoning LLM merged into SFT full's output, w 0.5", ((*AFTER, "task-arithmetic"),), wave=2, reference=SFT_FULL),
    Condition("merge TIES after SFT", "the same with TIES, w 0.5, density 0.2", ((*AFTER, "ties"),), wave=2, reference=SFT_FULL),
    Condition("SFT full + DRIFT adaptive_cosine", "α 1 (the released recipe)", (_drift("adaptive_cosine", "1.0"),), reference=SFT_FULL),
    Condition("SFT full + DRIFT gradnorm", "α 1", (_drift("gradnorm", "1.0"),), reference=SFT_FULL),
    Condition("SFT full + DRIFT absolute", "α 0.01, Δ normalised to ‖θ‖", (_drift("absolute", "0.01"),), reference=SFT_FULL),
    Condition("SFT full + DRIFT on probed layers", "adaptive_cosine α 1, Δ only on the layers `surgeon probe-layers` suggests", (_drift("adaptive_cosine", "1.0", "{prior_layers}"),), reference=SFT_FULL),
    Condition("SFT full + DRIFT, perception λ 0.5", "adaptive_cosine α 1 with L = 0.5·L_p + 0.5·L_r", ((*_drift("adaptive_cosine", "1.0"), "--perception-weight", "0.5"),), reference=SFT_FULL),
    Condition("SFT LoRA + DRIFT", "DRIFT through the LoRA adapters, adaptive_cosine α 1", ((*LORA, "--prior", "{prior}"),), reference=SFT_LORA),
    Condition("SFT LoRA + IADA", "adaptive aggregation at layer boundaries, r 4", _iada("adaptive"), reference=SFT_LORA),
    Condition("SFT LoRA + IADA fixed", "input-independent depth weights (the ablation)", _iada("fixed"), reference=SFT_LORA),
    Condition("SFT full, perception λ 0.5", "L = 0.5·L_p + 0.5·L_r", ((*FULL, "--perception-weight", "0.5"),), reference=SFT_FULL),
    Condition("SFT full, perception λ dynamic", "λ = ‖g_r‖/(‖g_p‖+‖g_r‖)", ((*FULL, "--perception-weight", "dynamic"),), reference=SFT_FULL),
    Condition(NEW_BASE, "the VLM after format training on red and green tiles, before SFT on blue and yellow", (), model="{vlm}", seeded=False, setting="new"),
    Condition(NEW_LORA, "LoRA SFT on blue and yellow tiles", (LORA,), setting="new", reference=NEW_BASE),
    Condition("new colours: Image-LoRA", "value adapters at visual tokens of the selected heads (a quarter of the KV heads), r 8", IMAGE_LORA, setting="new", reference=NEW_LORA),
]  # fmt: skip


@dataclass
class Run:
    condition: str
    seed: int
    size: str = ""
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0
    text: float | None = None
    perception: float | None = None
    end_to_end: float | None = None
    correct: dict[str, str] = field(default_factory=dict)  # metric -> "0110…", one digit per item


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
        done = subprocess.run([sys.executable, "-m", "surgeon.cli", *args], stdout=out, stderr=out, env=env)
    if done.returncode:
        raise SystemExit(f"Error: `surgeon {shlex.join(args)}` failed (exit {done.returncode}); see {log}")


def _bits(values: list[bool]) -> str:
    return "".join("1" if v else "0" for v in values)


def run_condition(cond: Condition, seed: int, size: str, places: dict[str, str], work: Path, device: str, threads: int) -> Run:
    """Run one condition's commands for one seed at one size, then evaluate what they wrote."""
    import torch

    import evaluate

    torch.set_num_threads(threads)
    runs = work / size / "runs"
    out = runs / f"{cond.slug}-seed{seed}"
    fill = dict(places, out=str(out), seed=str(seed), threads=str(threads), sft_run=str(runs / f"sft-full-seed{seed}"))
    if cond.setting == "new":
        fill.update(vlm=places["vlm_new"], sft=places["sft_new"])
    run, t0 = Run(cond.name, seed, size), time.time()
    for template in cond.commands:
        args = [a.format(**fill) for a in template]
        run.commands.append("surgeon " + shlex.join(args))
        _surgeon(args, _environment(threads, device), runs / f"{cond.slug}-seed{seed}.log")
    data = Path(places["data"])
    folder = cond.model.format(**fill)
    model = evaluate.load(folder, device)
    processor = _processor(folder if cond.text_only else places["vlm"], cond.text_only)
    text = evaluate.text_correct(model, processor, data / "eval-text.jsonl")
    run.correct["text"] = _bits(text)
    if not cond.text_only:
        visual = data / ("eval-visual-new.jsonl" if cond.setting == "new" else "eval-visual.jsonl")
        perception, end_to_end = evaluate.visual_correct(model, processor, visual)
        run.correct.update(perception=_bits(perception), end_to_end=_bits(end_to_end))
    for metric, bits in run.correct.items():
        setattr(run, metric, bits.count("1") / len(bits))
    run.seconds = round(time.time() - t0, 1)
    return run


def _processor(vlm: str, text_only: bool):
    from transformers import AutoProcessor, AutoTokenizer

    return AutoTokenizer.from_pretrained(vlm) if text_only else AutoProcessor.from_pretrained(vlm)


def prepare(work: Path, size: str, budget: Budget, device: str, log, new_setting: bool = True) -> dict[str, str]:
    """One size's organism, data sets, DRIFT priors, layer probe and (``new_setting``) the
    format-trained VLM (each built once per work folder and reused)."""
    import study

    folder = work / size
    places = study.organism_and_data(folder, size, budget, device, log, OLD_COLOURS, NEW_COLOURS)
    places.update(
        steps=str(budget.steps), batch=str(budget.batch), full_lr=str(budget.full_lr), lora_lr=str(budget.lora_lr),
        lora_rank=str(budget.lora_rank), lora_alpha=str(2 * budget.lora_rank), probe_steps=str(budget.probe_steps),
    )  # fmt: skip
    (folder / "runs").mkdir(exist_ok=True)
    env, logs = _environment(2, device), folder / "runs"
    places.update(study.priors_and_probe(folder, places, budget, lambda args, name: _surgeon(args, env, logs / name), log))
    if new_setting:
        places["vlm_new"] = study.format_trained_vlm(folder, places, budget, lambda args, name: _surgeon(args, env, logs / name))
    return places


def main(argv: list[str] | None = None) -> int:
    import study

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="the quick sizes and budget, one seed: a smoke run")
    parser.add_argument("--sizes", help="comma-separated organism sizes (default: small,deep; gpu,gpu-deep with --device cuda)")
    parser.add_argument("--seeds", type=int, help="seeds per trained condition (default 3, 1 with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the organisms and every command run")
    parser.add_argument("--jobs", type=int, help="runs at once (default: 2 on a CPU, 1 on a GPU)")
    parser.add_argument("--conditions", help="comma-separated condition slugs, e.g. sft-full,merge-ties (default: see --all)")
    parser.add_argument("--all", action="store_true", help="every condition at every size (the default with --quick and on a GPU; "
                        "on a CPU the default leaves out what the first study measured at 4 layers, and runs the core set at 8)")
    parser.add_argument("--render", action="store_true", help="only write the tables and figures of WORKDIR/results.json again")
    args = parser.parse_args(argv)
    if args.render:
        if not (args.workdir / "results.json").is_file():
            print(f"Error: {args.workdir / 'results.json'} does not exist; run the study first", file=sys.stderr)
            return 2
        saved = json.loads((args.workdir / "results.json").read_text())
        print(study.report(args.workdir, [Run(**r) for r in saved["runs"]], CONDITIONS, saved["sizes"]))
        return 0
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            print(f"Error: --device {args.device}: no such device here; use --device cpu", file=sys.stderr)
            return 2
    kind = "quick" if args.quick else "gpu" if args.device.startswith("cuda") else "cpu"
    sizes = args.sizes.split(",") if args.sizes else list(SIZE_SETS[kind])
    import organism

    if unknown := sorted(set(sizes) - set(organism.SIZES)):
        print(f"Error: --sizes: no size {', '.join(unknown)}; choose from {', '.join(organism.SIZES)}", file=sys.stderr)
        return 2
    budget = BUDGETS[kind]
    seeds = args.seeds or (1 if args.quick else 3)
    jobs = args.jobs or (1 if args.device.startswith("cuda") else 2)
    threads = max(1, (os.cpu_count() or 2) // jobs)
    wanted = args.conditions.split(",") if args.conditions else [c.slug for c in CONDITIONS]
    if unknown := sorted(set(wanted) - {c.slug for c in CONDITIONS}):
        names = ", ".join(c.slug for c in CONDITIONS)
        print(f"Error: --conditions: no condition {', '.join(unknown)}; choose from {names}", file=sys.stderr)
        return 2
    plan = {size: [c for c in CONDITIONS if c.slug in wanted] for size in sizes}
    if kind == "cpu" and not args.conditions and not args.all:
        plan = {size: [c for c in CONDITIONS if (c.slug in DEEP if size == "deep" else c.slug not in REPEATED)] for size in sizes}
    for chosen in plan.values():
        if any(c.wave == 2 for c in chosen) and SFT_FULL not in [c.name for c in chosen]:
            chosen.insert(0, next(c for c in CONDITIONS if c.name == SFT_FULL))  # merges after SFT read its outputs
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    places = {size: prepare(work, size, budget, args.device, log, any(c.setting == "new" for c in plan[size])) for size in sizes}
    prepared = time.time() - t0
    tasks = [(c, s, size) for size in sizes for c in plan[size] for s in (range(seeds) if c.seeded else [0])]
    log(f"organisms ready ({prepared:.0f} s); {len(tasks)} runs, {jobs} at once")
    runs: list[Run] = []
    ctx = __import__("multiprocessing").get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        for wave in (1, 2):
            futures = [pool.submit(run_condition, c, s, size, places[size], work, args.device, threads) for c, s, size in tasks if c.wave == wave]
            for future in as_completed(futures):
                run = future.result()
                runs.append(run)
                log(f"  [{run.size}] {run.condition} seed {run.seed}: text {run.text} perception {run.perception} "
                    f"end-to-end {run.end_to_end} ({run.seconds} s)")  # fmt: skip
    order = [c.name for c in CONDITIONS]
    runs.sort(key=lambda r: (sizes.index(r.size), order.index(r.condition), r.seed))
    result = {
        "command": "python examples/reasoning_tax/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "sizes": sizes, "budget": asdict(budget), "seeds": seeds, "jobs": jobs, "device": args.device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "libraries": study.versions(), "prepare_seconds": round(prepared), "seconds": round(time.time() - t0),
        "organisms": {size: json.loads((work / size / "organism" / "done.json").read_text()) for size in sizes},
        "places": places, "runs": [asdict(r) for r in runs],
    }  # fmt: skip
    (work / "results.json").write_text(json.dumps(result, indent=1))
    print(study.report(work, runs, CONDITIONS, sizes))
    log(f"done in {time.time() - t0:.0f} s: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
