"""``surgeon demo``: the whole pipeline on tiny models built on the spot (CPU, well under a minute).

    for step in run_demo("demo/", hub="local"):
        print(step.name, step.output, step.summary)

build → inspect → prior → merge → inject-iada → score-heads → train (DRIFT + IADA + dynamic
perception/reasoning weighting) → push. Each step writes into its own folder under the work
folder and reports what it wrote. ``hub``: None pushes as a dry run (prints what would be sent,
sends nothing), ``"local"`` starts a local stand-in of the Hub's API for the push, and a URL
pushes to a stand-in (or Hub) already running there.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from surgeon.errors import ConfigError
from surgeon.io.output import check_output

DEMO_REPO = "surgeon-demo/tiny-qwen2.5-vl-drift-iada"


@dataclass(frozen=True)
class Step:
    """One finished demo step: what ran, where its output is, a one-line summary."""

    name: str
    output: str
    summary: str
    seconds: float


def run_demo(workdir: str | Path, overwrite: bool = False, hub: str | None = None) -> Iterator[Step]:
    """Build a tiny VLM, a matching reasoning LLM and a small dataset, then run each surgeon step.

    Checks the work folder at once (not on first iteration); yields each step as it finishes.
    """
    work = Path(workdir)
    if hub not in (None, "local") and urlsplit(hub).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError("hub", f"{hub} is not on this machine; the demo pushes only to a local stand-in", "use `surgeon push` for the Hub")
    check_output(work, overwrite)
    work.mkdir(parents=True, exist_ok=True)
    return _steps(work, hub)


def _timed(name: str, fn: Callable[[], tuple[Path | str, str]]) -> Step:
    start = time.perf_counter()
    output, summary = fn()
    return Step(name, str(output), summary, time.perf_counter() - start)


def _steps(work: Path, hub: str | None) -> Iterator[Step]:
    vlm, llm, data = work / "vlm", work / "reasoning-llm", work / "data"
    prior, iada, heads, trained = work / "prior", work / "vlm-iada", work / "heads", work / "trained"

    def build() -> tuple[Path, str]:
        from surgeon.demo import tiny
        from surgeon.demo.synthetic import make_dataset

        for folder in (vlm, llm, data):  # with --overwrite: replace only the demo's own folders
            shutil.rmtree(folder, ignore_errors=True)
        tiny.build("qwen2_5_vl", vlm, seed=0)
        tiny.build_reasoning_llm(vlm, llm, family="qwen2")
        make_dataset(data, n=24, seed=0)
        return work, "tiny Qwen2.5-VL (vlm/), a reasoning LLM sharing its language model, 24 tagged samples (data/)"

    def inspect() -> tuple[Path, str]:
        from surgeon.io.checkpoint import open_checkpoint
        from surgeon.anatomy.inspect import inspect_checkpoint

        with open_checkpoint(vlm) as ckpt:
            r = inspect_checkpoint(ckpt)
        p = r.params
        return vlm, f"{r.architecture}: {r.num_layers} layers, {p['language_model']:,} LM / {p['vision']:,} vision / {p['projector']:,} projector params"

    def make_prior() -> tuple[Path, str]:
        from surgeon.drift.prior import PriorConfig, compute_prior

        r = compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(prior), overwrite=True))
        t = r.total
        return prior, f"Δ for {r.counts['selected']} tensors ({r.selection}): ‖Δ‖/‖θ‖ {t['relative_distance']:.4f}, cos {t['cosine']:.6f}"

    def merge() -> tuple[Path, str]:
        from surgeon.merge.engine import MergeConfig, merge_models

        config = MergeConfig(reasoning=(str(llm),), vlm=str(vlm), output=str(work / "merged"), method="task-arithmetic", overwrite=True)
        r = merge_models(config)
        return work / "merged", f"task arithmetic (w={r.params['weight']}): {r.counts['merged']} LM tensors merged, {r.counts['vision']} vision tensors copied"

    def inject() -> tuple[Path, str]:
        from surgeon.modules.iada import IadaConfig, inject_iada

        result = inject_iada(str(vlm), iada, IadaConfig(block_size=2), overwrite=True)
        after = ", ".join(str(b.after_layers) for b in result.plan.boundaries)
        return iada, f"IADA blocks after layers {after}: +{result.plan.params:,} parameters, same outputs until trained"

    def score() -> tuple[Path, str]:
        from surgeon.heads.score import ScoreHeadsConfig, score_heads

        r = score_heads(ScoreHeadsConfig(model=str(vlm), data=str(data / "data.jsonl"), output=str(heads), steps=4, overwrite=True))
        return heads, (
            f"{r.probe} scores of {r.num_layers}×{r.num_kv_heads} KV heads; {r.budget} selected for Image-LoRA, "
            f"adapter FLOPs {r.flops['ratio']:.1%} of v_proj LoRA at {r.flops['visual_fraction']:.1%} visual tokens"
        )

    def fine_tune() -> tuple[Path, str]:
        from surgeon.training.config import TrainConfig
        from surgeon.training.loop import train

        config = TrainConfig(
            model=str(iada), data=str(data / "data.jsonl"), output=str(trained), full=True, prior=str(prior),
            perception_weight="dynamic", max_steps=3, batch_size=2, lr=1e-4, warmup_ratio=0.0, overwrite=True,
        )  # fmt: skip
        m = train(config).metrics
        return trained, (
            f"3 full steps, DRIFT on {m['drift_tensors']} tensors, IADA trained, dynamic λ {m['lambda']:.2f}: "
            f"loss {m['loss']:.3f} (perception {m['loss_perception']:.3f}, reasoning {m['loss_reasoning']:.3f})"
        )

    def push() -> tuple[str, str]:
        from surgeon.hub.client import PushConfig, push_folder

        if hub is None:
            r = push_folder(trained, PushConfig(repo=DEMO_REPO, dry_run=True))
            return f"(dry run) {DEMO_REPO}", f"would send {len(r.files)} files with a card built from surgeon.json; nothing sent"
        if hub == "local":
            from surgeon.demo.hub_standin import HubStandIn

            with HubStandIn() as standin:
                r = push_folder(trained, PushConfig(repo=DEMO_REPO, token="hf_demo"), endpoint=standin.url)
                arrived = len(standin.files(DEMO_REPO))
        else:
            r = push_folder(trained, PushConfig(repo=DEMO_REPO, token="hf_demo"), endpoint=hub)
            arrived = len(r.files)
        return r.url, f"pushed {arrived} files in commit {str(r.commit)[:10]} with a card built from surgeon.json"

    for name, fn in [
        ("build", build),
        ("inspect", inspect),
        ("prior", make_prior),
        ("merge", merge),
        ("inject-iada", inject),
        ("score-heads", score),
        ("train", fine_tune),
        ("push", push),
    ]:
        yield _timed(name, fn)
