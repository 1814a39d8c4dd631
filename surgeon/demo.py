"""``surgeon demo``: the whole pipeline on tiny models built on the spot (CPU, seconds).

    for step in run_demo("demo/"):
        print(step.name, step.output, step.summary)

Each step writes into its own folder under the work folder and reports what it wrote.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from surgeon.output import check_output


@dataclass(frozen=True)
class Step:
    """One finished demo step: what ran, where its output is, a one-line summary."""

    name: str
    output: str
    summary: str
    seconds: float


def run_demo(workdir: str | Path, overwrite: bool = False) -> Iterator[Step]:
    """Build a tiny VLM and a matching reasoning LLM, then run each surgeon step on them.

    Checks the work folder at once (not on first iteration); yields each step as it finishes.
    """
    work = Path(workdir)
    check_output(work, overwrite)
    work.mkdir(parents=True, exist_ok=True)
    return _steps(work)


def _steps(work: Path) -> Iterator[Step]:
    from surgeon import tiny
    from surgeon.checkpoint import open_checkpoint
    from surgeon.inspect import inspect_checkpoint

    def timed(name: str, fn: Callable[[], tuple[Path, str]]) -> Step:
        start = time.perf_counter()
        output, summary = fn()
        return Step(name, str(output), summary, time.perf_counter() - start)

    vlm, llm = work / "vlm", work / "reasoning-llm"

    def build() -> tuple[Path, str]:
        for folder in (vlm, llm):  # with --overwrite: replace only the demo's own folders
            shutil.rmtree(folder, ignore_errors=True)
        tiny.build("qwen2_5_vl", vlm, seed=0)
        tiny.build_reasoning_llm(vlm, llm, family="qwen2")
        return work, "tiny Qwen2.5-VL (vlm/) and a reasoning LLM sharing its language model (reasoning-llm/)"

    yield timed("build", build)

    def inspect() -> tuple[Path, str]:
        with open_checkpoint(vlm) as ckpt:
            r = inspect_checkpoint(ckpt)
        p = r.params
        return vlm, f"{r.architecture}: {r.num_layers} layers, {p['language_model']:,} LM / {p['vision']:,} vision / {p['projector']:,} projector params"

    yield timed("inspect", inspect)

    def prior() -> tuple[Path, str]:
        from surgeon.prior import PriorConfig, compute_prior

        r = compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(work / "prior"), overwrite=True))
        t = r.total
        return work / "prior", f"Δ for {r.counts['selected']} tensors ({r.selection}): ‖Δ‖/‖θ‖ {t['relative_distance']:.4f}, cos {t['cosine']:.6f}"

    yield timed("prior", prior)

    def merge() -> tuple[Path, str]:
        from surgeon.merge.engine import MergeConfig, merge_models

        r = merge_models(MergeConfig(reasoning=(str(llm),), vlm=str(vlm), output=str(work / "merged"), method="task-arithmetic", overwrite=True))
        return work / "merged", f"task arithmetic (w={r.params['weight']}): {r.counts['merged']} LM tensors merged, {r.counts['vision']} vision tensors copied"

    yield timed("merge", merge)

    def iada() -> tuple[Path, str]:
        from surgeon.iada import IadaConfig, inject_iada

        result = inject_iada(str(vlm), work / "vlm-iada", IadaConfig(block_size=2), overwrite=True)
        after = ", ".join(str(b.after_layers) for b in result.plan.boundaries)
        return work / "vlm-iada", f"IADA blocks after layers {after}: +{result.plan.params:,} parameters, same outputs until trained"

    yield timed("inject-iada", iada)

    def heads() -> tuple[Path, str]:
        from surgeon.heads import ScoreHeadsConfig, score_heads

        data = _shapes_dataset(work / "shapes")
        config = ScoreHeadsConfig(model=str(vlm), data=str(data), output=str(work / "heads"), steps=4, overwrite=True)
        r = score_heads(config)
        return work / "heads", (
            f"{r.probe} scores of {r.num_layers}×{r.num_kv_heads} KV heads on {r.batches} image batches; "
            f"{r.budget} selected for Image-LoRA, adapter FLOPs {r.flops['ratio']:.1%} of v_proj LoRA "
            f"at {r.flops['visual_fraction']:.1%} visual tokens"
        )

    yield timed("score-heads", heads)


def _shapes_dataset(folder: Path, n: int = 6) -> Path:
    """A few coloured-square images with a question and a tagged answer each (TRL JSONL)."""
    import json

    from PIL import Image, ImageDraw

    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
    lines = []
    for i in range(n):
        name, rgb = list(colours.items())[i % len(colours)]
        image = Image.new("RGB", (56 + 28 * (i % 2), 56), (255, 255, 255))
        ImageDraw.Draw(image).rectangle((12, 12, 44, 44), fill=rgb)
        image.save(folder / "images" / f"{i}.png")
        user = [{"type": "image", "image": f"images/{i}.png"}, {"type": "text", "text": "What color is the square?"}]
        answer = f"<perception>The square is {name}.</perception> Answer: {name}"
        lines.append(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"
