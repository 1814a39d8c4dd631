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


@dataclass(frozen=True)
class _Paths:
    """Where each demo step writes, under the work folder; ``hub`` as ``run_demo`` takes it."""

    work: Path
    hub: str | None

    @property
    def vlm(self) -> Path:
        return self.work / "vlm"

    @property
    def llm(self) -> Path:
        return self.work / "reasoning-llm"

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def prior(self) -> Path:
        return self.work / "prior"

    @property
    def iada(self) -> Path:
        return self.work / "vlm-iada"

    @property
    def heads(self) -> Path:
        return self.work / "heads"

    @property
    def trained(self) -> Path:
        return self.work / "trained"


def _steps(work: Path, hub: str | None) -> Iterator[Step]:
    paths = _Paths(work, hub)
    for name, fn in STEPS:
        yield _timed(name, lambda fn=fn: fn(paths))  # type: ignore[misc]


def _build(p: _Paths) -> tuple[Path, str]:
    from surgeon.demo import tiny
    from surgeon.demo.synthetic import make_dataset

    for folder in (p.vlm, p.llm, p.data):  # with --overwrite: replace only the demo's own folders
        shutil.rmtree(folder, ignore_errors=True)
    tiny.build("qwen2_5_vl", p.vlm, seed=0)
    tiny.build_reasoning_llm(p.vlm, p.llm, family="qwen2")
    make_dataset(p.data, n=24, seed=0)
    return p.work, "tiny Qwen2.5-VL (vlm/), a reasoning LLM sharing its language model, 24 tagged samples (data/)"


def _inspect(p: _Paths) -> tuple[Path, str]:
    from surgeon.hub.sources import open_checkpoint
    from surgeon.anatomy.inspect import inspect_checkpoint

    with open_checkpoint(p.vlm) as ckpt:
        r = inspect_checkpoint(ckpt)
    n = r.params
    return p.vlm, f"{r.architecture}: {r.num_layers} layers, {n['language_model']:,} LM / {n['vision']:,} vision / {n['projector']:,} projector params"


def _make_prior(p: _Paths) -> tuple[Path, str]:
    from surgeon.drift.prior import PriorConfig, compute_prior

    r = compute_prior(PriorConfig(reasoning=str(p.llm), vlm=str(p.vlm), output=str(p.prior), overwrite=True))
    t = r.total
    return p.prior, f"Δ for {r.counts['selected']} tensors ({r.selection}): ‖Δ‖/‖θ‖ {t['relative_distance']:.4f}, cos {t['cosine']:.6f}"


def _merge(p: _Paths) -> tuple[Path, str]:
    from surgeon.merge.engine import MergeConfig, merge_models

    config = MergeConfig(reasoning=(str(p.llm),), vlm=str(p.vlm), output=str(p.work / "merged"), method="task-arithmetic", overwrite=True)
    r = merge_models(config)
    return p.work / "merged", f"task arithmetic (w={r.params['weight']}): {r.counts['merged']} LM tensors merged, {r.counts['vision']} vision tensors copied"


def _inject(p: _Paths) -> tuple[Path, str]:
    from surgeon.modules.iada import IadaConfig, inject_iada

    result = inject_iada(str(p.vlm), p.iada, IadaConfig(block_size=2), overwrite=True)
    after = ", ".join(str(b.after_layers) for b in result.plan.boundaries)
    return p.iada, f"IADA blocks after layers {after}: +{result.plan.params:,} parameters, same outputs until trained"


def _score(p: _Paths) -> tuple[Path, str]:
    from surgeon.heads.score import ScoreHeadsConfig, score_heads

    r = score_heads(ScoreHeadsConfig(model=str(p.vlm), data=str(p.data / "data.jsonl"), output=str(p.heads), steps=4, overwrite=True))
    return p.heads, (
        f"{r.probe} scores of {r.num_layers}×{r.num_kv_heads} KV heads; {r.budget} selected for Image-LoRA, "
        f"adapter FLOPs {r.flops['ratio']:.1%} of v_proj LoRA at {r.flops['visual_fraction']:.1%} visual tokens"
    )


def _fine_tune(p: _Paths) -> tuple[Path, str]:
    from surgeon.training.config import TrainConfig
    from surgeon.training.loop import train

    config = TrainConfig(
        model=str(p.iada), data=str(p.data / "data.jsonl"), output=str(p.trained), full=True, prior=str(p.prior),
        perception_weight="dynamic", max_steps=3, batch_size=2, lr=1e-4, warmup_ratio=0.0, overwrite=True,
    )  # fmt: skip
    m = train(config).metrics
    return p.trained, (
        f"3 full steps, DRIFT on {m['drift_tensors']} tensors, IADA trained, dynamic λ {m['lambda']:.2f}: "
        f"loss {m['loss']:.3f} (perception {m['loss_perception']:.3f}, reasoning {m['loss_reasoning']:.3f})"
    )


def _push(p: _Paths) -> tuple[str, str]:
    from surgeon.publish.push import PushConfig, push_folder

    if p.hub is None:
        r = push_folder(p.trained, PushConfig(repo=DEMO_REPO, dry_run=True))
        return f"(dry run) {DEMO_REPO}", f"would send {len(r.files)} files with a card built from surgeon.json; nothing sent"
    if p.hub == "local":
        from surgeon.demo.hub_standin import HubStandIn

        with HubStandIn() as standin:
            r = push_folder(p.trained, PushConfig(repo=DEMO_REPO, token="hf_demo"), endpoint=standin.url)
            arrived = len(standin.files(DEMO_REPO))
    else:
        r = push_folder(p.trained, PushConfig(repo=DEMO_REPO, token="hf_demo"), endpoint=p.hub)
        arrived = len(r.files)
    return r.url, f"pushed {arrived} files in commit {str(r.commit)[:10]} with a card built from surgeon.json"


STEPS: list[tuple[str, Callable[[_Paths], tuple[Path | str, str]]]] = [
    ("build", _build), ("inspect", _inspect), ("prior", _make_prior), ("merge", _merge), ("inject-iada", _inject),
    ("score-heads", _score), ("train", _fine_tune), ("push", _push),
]  # fmt: skip
