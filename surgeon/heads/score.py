"""Head influence scores and the KV heads Image-LoRA adapts (``surgeon score-heads``, docs/methods.md §4).

    result = score_heads(ScoreHeadsConfig(model="vlm/", data="data.jsonl", output="heads.json"))
    result.scores        # [layers][kv_heads]: Σ over probe batches of the probe's squared gradients
    result.selected      # [layers][selected KV heads], what `surgeon train --image-lora` adapts
    read_heads("heads.json").selected

Scoring: the model is frozen; a probe (``surgeon.heads.probes``: ``gate`` as released, ``rank1`` as the
paper describes) acts at visual tokens only; each probe batch's loss is the token-averaged
cross-entropy of its answer tokens (the assistant turns, as ``surgeon train`` supervises them).

Selection (``surgeon.heads.budget``): a global budget K spread over layers by score mass^τ, or a
fixed ``per_layer`` count; each layer keeps its highest-scoring heads.

Output: ``heads.json`` (scores, per-layer budgets, selected heads, the FLOPs report and, under
``"surgeon"``, the provenance record), written atomically. ``output`` ending in ``.json`` is that
file; any other path is a folder holding ``heads.json`` and ``surgeon.json`` (what ``surgeon push``
publishes).
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from surgeon import dtypes
from surgeon.errors import ConfigError, DataError
from surgeon.heads.budget import select_heads

HEADS_FILE = "heads.json"
FORMAT = "surgeon-head-scores/1"
FLOPS_RANK = 8  # the reference's default rank; the FLOPs ratio does not depend on it
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ScoreHeadsConfig:
    """What to score and how to select. Defaults marked (ours) are not specified by the paper.

    probe: ``gate`` (as released) or ``rank1`` (the paper's description).
    steps, batch_size: probe batches and samples per batch (ours: 32 × 1); the probe samples are
        the data's samples with images, in a seeded random order.
    budget: K heads in all (default: a quarter of all KV heads, the reference's); tau: τ.
    per_layer: a fixed count per layer instead of the budget.
    output: heads.json, or a folder; None writes nothing. plot: a picture of the scores (PNG…).
    device, dtype: ``auto`` is the first GPU (checkpoint dtype) when there is one, else the CPU
        (float32).
    """

    model: str
    data: str
    output: str | None = None
    probe: str = "gate"
    steps: int = 32
    batch_size: int = 1
    budget: int | None = None
    tau: float = 0.5
    per_layer: int | None = None
    max_length: int = 2048
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    skip_bad_lines: bool = False
    plot: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        from surgeon.heads.probes import PROBES

        if self.probe not in PROBES:
            raise ConfigError("probe", f"unknown probe {self.probe!r}", f"choose one of {', '.join(PROBES)}")
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.budget is not None and self.budget < 1:
            raise ConfigError("budget", f"must be at least 1, got {self.budget}")
        if self.per_layer is not None and self.per_layer < 1:
            raise ConfigError("per_layer", f"must be at least 1, got {self.per_layer}")
        if self.per_layer is not None and self.budget is not None:
            raise ConfigError("per_layer", "a per-layer count and a global budget exclude each other", "give one of them")
        if not (self.tau >= 0 and math.isfinite(self.tau)):
            raise ConfigError("tau", f"must be a finite number ≥ 0, got {self.tau}")
        object.__setattr__(self, "dtype", dtypes.short(self.dtype, extra=("auto",)))


@dataclass(frozen=True)
class HeadScores:
    """Scores ``[num_layers][num_kv_heads]``, the per-layer budgets and the selected heads of one
    model, with what was measured (probe batches, tokens, visual tokens, the FLOPs report)."""

    model: str
    probe: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    scores: list[list[float]]
    budget: int
    tau: float | None
    per_layer: int | None
    layer_budgets: list[int]
    selected: list[list[int]]
    batches: int = 0
    samples: int = 0
    tokens: int = 0
    visual_tokens: int = 0
    flops: dict = field(default_factory=dict)
    output: str | None = None

    def to_dict(self) -> dict:
        return {"format": FORMAT, **{k: v for k, v in asdict(self).items() if k != "output"}}

    @classmethod
    def from_dict(cls, data: dict, output: str | None = None) -> HeadScores:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and k != "output"}, output=output)


# --------------------------------------------------------------------------------------- scoring
def score_heads(config: ScoreHeadsConfig, progress: Progress | None = None) -> HeadScores:
    """Score every KV head of ``config.model`` on probe batches of ``config.data``, select heads,
    and write ``config.output`` (and ``config.plot``) when given. ``progress(task, done, total)``."""
    from surgeon.data.samples import DataStats
    from surgeon.modules.image_lora import flops_report
    from surgeon.modules.modeling_surgeon import decoder_of, value_dims

    if config.output is not None:
        check_heads_output(config.output, config.overwrite, [config.model, config.data])
    if config.plot is not None:
        check_plot(config.plot, config.overwrite)
    stats = DataStats()
    scanned, samples = _probe_samples(config, stats)
    source, encoder, model = _load(config)
    hidden, kv, head_dim = value_dims(model)
    num_layers = len(decoder_of(model)[1])
    select_heads([[0.0] * kv] * num_layers, config.budget, config.tau, config.per_layer)  # bad numbers fail before probing
    total, counts = _probe(config, model, encoder, samples, stats, num_layers, kv, progress)
    scores = total.tolist()
    budgets, selected = select_heads(scores, config.budget, config.tau, config.per_layer)
    flops = flops_report(selected, hidden, kv, head_dim, counts["tokens"], counts["visual"], FLOPS_RANK)
    result = HeadScores(
        model=config.model, probe=config.probe, num_layers=num_layers, num_kv_heads=kv, head_dim=head_dim,
        hidden_size=hidden, scores=scores, budget=sum(budgets),
        tau=None if config.per_layer is not None else config.tau, per_layer=config.per_layer,
        layer_budgets=budgets, selected=selected, batches=counts["batches"], samples=counts["samples"], tokens=counts["tokens"],
        visual_tokens=counts["visual"], flops=flops.to_dict(), output=config.output,
    )  # fmt: skip
    if config.output is not None:
        from surgeon.io.provenance import build_record

        inputs = {"model": source, "data": {"source": config.data, "sha256": scanned.rows.fingerprint()}}
        stats_out = {"batches": counts["batches"], "samples": counts["samples"], "tokens": counts["tokens"], "visual_tokens": counts["visual"],
                     "budget": result.budget, "flops_ratio": flops.ratio, "data": stats.to_dict()}  # fmt: skip
        record = build_record("score-heads", "head-scores", config, inputs, stats_out, methods=("image-lora", "head-scores"))
        write_heads(result, config.output, config.overwrite, record)
    if config.plot is not None:
        plot_heads(result, config.plot)
    return result


def _probe_samples(config: ScoreHeadsConfig, stats: Any) -> tuple[Any, Any]:
    """(the scanned data, its samples with images in the seed's order, parsed as the probe reaches them)."""
    from surgeon.data.scan import scan_samples

    scanned = scan_samples(config.data, None, config.skip_bad_lines, None, stats)
    if not scanned.images:
        raise DataError(config.data, "has no sample with an image", "head scores need samples with images")
    order = list(scanned.with_images)
    random.Random(config.seed).shuffle(order)
    return scanned, scanned.samples(order)


def _load(config: ScoreHeadsConfig) -> tuple[dict, Any, Any]:
    """(how the model is recorded, its encoder, the model in eval mode on ``config.device``)."""
    from surgeon.data.encoding import SampleEncoder
    from surgeon.hub.sources import open_checkpoint
    from surgeon.modules.folders import load_eval_model

    with open_checkpoint(config.model) as ckpt:
        source = ckpt.describe()
        encoder = SampleEncoder.from_pretrained(ckpt.path, config.max_length, name=config.model)
        model = load_eval_model(ckpt.path, config.device, config.dtype)
    return source, encoder, model


def _probe(
    config: ScoreHeadsConfig, model: Any, encoder: Any, samples: Any, stats: Any, num_layers: int, kv: int, progress: Progress | None
) -> tuple[Any, dict[str, int]]:
    """The summed head scores [layers, KV heads] over ``config.steps`` probe batches of the frozen
    model, and what the batches held (batches, samples, tokens, visual tokens)."""
    import torch

    from surgeon.data.encoding import IGNORE_INDEX
    from surgeon.data.loading import encode_samples
    from surgeon.heads.probes import PROBES
    from surgeon.modules.modeling_surgeon import token_context, visual_token_ids
    from surgeon.perception.reweight import token_losses

    model.requires_grad_(False)
    device = next(model.parameters()).device
    probe = PROBES[config.probe](model, token_context(model), config.seed).to(device)
    handles = probe.attach(model)
    visual_ids = torch.tensor(visual_token_ids(model.config))
    total = torch.zeros(num_layers, kv)
    counts = {"batches": 0, "samples": 0, "tokens": 0, "visual": 0}

    def run(items: list[Any]) -> None:
        batch = encoder.collate(items)
        labels = batch.pop("labels")
        batch.pop("perception_mask")
        real = batch["attention_mask"].bool()
        counts["samples"] += len(items)
        counts["tokens"] += int(real.sum())
        counts["visual"] += int((torch.isin(batch["input_ids"], visual_ids) & real).sum())
        batch = {k: v.to(device, model.dtype if v.is_floating_point() else None) for k, v in batch.items()}
        logits = model(**batch, use_cache=False).logits
        ce = token_losses(logits, labels.to(logits.device))
        loss = ce.sum() / max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
        if loss.requires_grad:  # False when the batch has no visual token: it adds nothing
            probe.zero_grad(set_to_none=True)
            loss.backward()
            total.add_(probe.batch_scores())
        counts["batches"] += 1
        if progress:
            progress("probing", counts["batches"], config.steps)

    pending: list[Any] = []
    try:
        for _, enc in encode_samples(samples, encoder, stats, config.skip_bad_lines):
            pending.append(enc)
            if len(pending) == config.batch_size:
                run(pending)
                pending = []
                if counts["batches"] == config.steps:
                    break
        if pending:
            run(pending)
    finally:
        for handle in handles:
            handle.remove()
    if counts["visual"] == 0:
        raise DataError(config.data, "the probe batches hold no image or video tokens", "check the data's images")
    if not torch.isfinite(total).all():
        raise DataError(config.data, "the probe produced non-finite scores", "score in float32 (--dtype float32)")
    return total, counts


# ----------------------------------------------------------------------------------------- files
def _is_file_output(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".json"


def check_heads_output(output: str | Path, overwrite: bool, inputs: list[str | None] | None = None) -> None:
    """Refuse an output that exists (a file, or a non-empty folder) unless ``overwrite``, and one
    that is, lies inside or contains one of the local ``inputs``."""
    from surgeon.io.output import check_apart, check_output

    path = Path(output)
    check_apart(path, inputs or [])
    if not _is_file_output(path):
        check_output(path, overwrite)
    elif path.is_dir():
        raise ConfigError("output", f"{output} is a folder", "give a .json file name, or a folder name without .json")
    elif path.exists() and not overwrite:
        raise ConfigError("output", f"{output} already exists", "choose another output or pass --overwrite to replace it")


def check_plot(path: str | Path, overwrite: bool) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("plot", "matplotlib is not installed", "pip install 'surgeon[plot]' (or pip install matplotlib)")
    if Path(path).exists() and not overwrite:
        raise ConfigError("plot", f"{path} already exists", "choose another file or pass --overwrite to replace it")


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(tmp)`` for a hidden sibling file, then rename it to ``path``."""
    from surgeon.io.output import sibling

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(path, f"tmp-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_heads(result: HeadScores, output: str | Path, overwrite: bool = False, record: dict | None = None) -> Path:
    """Write ``heads.json`` (with ``record`` under ``"surgeon"``) to a ``.json`` path, or a folder
    with ``heads.json`` and ``surgeon.json``; atomically. Returns the heads.json path."""
    from surgeon.io.output import output_folder
    from surgeon.io.provenance import write_record

    check_heads_output(output, overwrite)
    text = json.dumps({**result.to_dict(), **({"surgeon": record} if record else {})}, indent=1) + "\n"
    path = Path(output)
    if _is_file_output(path):
        _write_atomic(path, lambda tmp: tmp.write_text(text))
        return path
    with output_folder(path, overwrite) as tmp:
        (tmp / HEADS_FILE).write_text(text)
        if record:
            write_record(tmp, record)
    return path / HEADS_FILE


MAX_HEADS_BYTES = 64 * 10**6  # a heads.json holds a few numbers per KV head


def heads_file(path: str | Path) -> Path:
    """``path`` itself, or the heads.json inside a folder."""
    p = Path(path)
    return p / HEADS_FILE if p.is_dir() else p


def read_heads(path: str | Path, field_name: str = "heads") -> HeadScores:
    """Read a heads.json (or a folder holding one) written by ``surgeon score-heads``."""
    from surgeon.io.paths import special_kind

    p = heads_file(path)
    kind = special_kind(p)
    if kind or (p.is_file() and p.stat().st_size > MAX_HEADS_BYTES):
        problem = f"is {kind}, not a heads.json" if kind else f"is {p.stat().st_size / 1e6:.0f} MB, too large for a heads.json"
        raise ConfigError(field_name, f"{path}: {problem}", "give the heads.json of surgeon score-heads")
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(field_name, f"{path}: no such file", "give the heads.json of surgeon score-heads") from None
    except (OSError, ValueError) as e:
        raise ConfigError(field_name, f"{path}: cannot read it as JSON ({e})") from None
    selected = data.get("selected") if isinstance(data, dict) else None
    rows_ok = isinstance(selected, list) and all(isinstance(r, list) and all(isinstance(h, int) for h in r) for r in selected)
    if not rows_ok:
        hint = "give the heads.json of surgeon score-heads"
        raise ConfigError(field_name, f"{path}: holds no per-layer list of selected heads", hint)
    try:
        return HeadScores.from_dict(data, output=str(path))
    except TypeError as e:
        raise ConfigError(field_name, f"{path}: is not a heads.json of surgeon score-heads ({e})") from None


def plot_heads(result: HeadScores, path: str | Path) -> Path:
    """A layers × heads picture of the scores (colour scaled to the largest score, selected heads ringed)."""
    check_plot(path, overwrite=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = result.num_layers, result.num_kv_heads
    fig, ax = plt.subplots(figsize=(max(3.6, 1.6 + 0.5 * heads), 1.4 + 0.28 * layers))
    image = ax.imshow(result.scores, aspect="auto", cmap="viridis", interpolation="nearest")
    for layer, chosen in enumerate(result.selected):
        for h in chosen:
            ax.scatter(h, layer, s=60, facecolors="none", edgecolors="red", linewidths=1.5)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(f"{result.probe} scores, {result.budget} heads selected", fontsize=9)
    fig.colorbar(image, ax=ax, label="score", format="%.1e")
    fig.tight_layout()
    out = Path(path)
    _write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".").lower() or "png"))
    plt.close(fig)
    return out
