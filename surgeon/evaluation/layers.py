"""``surgeon probe-layers``: where, layer by layer, a VLM reads its images and how its layers take
the reasoning model's weights (docs/methods.md §7).

    result = probe_layers(ProbeConfig(vlm="vlm/", reasoning="r1/", data="probe.jsonl", output="probe/"))
    result.suggested_layers       # "14-27": a --layers range for prior, merge and train

Two probes, each one pass per decoder layer ℓ over a small set:

- *swap* (text rows of ``data``): the VLM's loss when layer ℓ's language-model tensors (``modules``,
  default attn,mlp) are θ_VLM + w·(θ_reasoning − θ_VLM) (w = ``weight``; 1 replaces them). Only
  that layer's tensors are read, from both checkpoints, and only that layer's originals are kept
  to restore it exactly afterwards.
- *mask-vision* (rows with images of ``image_data``, else of ``data``): the VLM's loss when no text
  token may attend to an image token from layer ℓ on (``surgeon.evaluation.masking``). Where the
  curve has come down to the unmasked loss, the layers from there on no longer read the images:
  the plateau.

With ``accuracy`` (default: when rows carry an ``answer`` field) each pass also generates and
scores the rows as ``surgeon eval`` does. The suggested range: the plateau's layers whose swap
raises the text loss no more than the median layer's (both probes), the plateau alone, or the
swap's below-median layers alone.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from surgeon.errors import ConfigError, DataError

Progress = Callable[[str, int, int], None]
PROBES = ("swap", "mask-vision")
IGNORE = -100


@dataclass(frozen=True)
class ProbeConfig:
    """Options of ``surgeon probe-layers``; each CLI option is one field."""

    vlm: str
    data: str  # rows for the swap probe (its text-only rows) and, without image_data, the mask-vision probe
    reasoning: str | None = None  # the text reasoning LLM whose layers are swapped in
    image_data: str | None = None  # rows with images for the mask-vision probe (default: those of data)
    probes: tuple[str, ...] = PROBES
    weight: float = 1.0  # swap: θ_VLM + weight·(θ_reasoning − θ_VLM)
    modules: str = "attn,mlp"  # the tensors of a layer the swap replaces (prior's grammar)
    limit: int | None = 64  # rows of each probe set
    batch_size: int = 4
    max_length: int = 2048
    accuracy: bool | None = None  # None: when the rows carry an ``answer`` field
    max_new_tokens: int = 64
    tolerance: float = 0.05  # plateau: |loss(masked from ℓ) − loss(unmasked)| ≤ tolerance·(loss(all masked) − loss(unmasked))
    device: str = "auto"
    dtype: str = "auto"
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        probes = tuple(dict.fromkeys(p.strip() for p in (self.probes.split(",") if isinstance(self.probes, str) else self.probes) if p.strip()))
        if not probes or any(p not in PROBES for p in probes):
            raise ConfigError("probes", f"{','.join(probes) or 'nothing'} is not a probe", f"choose from {', '.join(PROBES)}")
        object.__setattr__(self, "probes", probes)
        if "swap" in probes and not self.reasoning:
            raise ConfigError("reasoning", "the swap probe needs the reasoning model", "pass --reasoning MODEL, or --probe mask-vision")
        if not (math.isfinite(self.weight) and 0 < self.weight <= 1):
            raise ConfigError("weight", f"must lie in (0, 1], got {self.weight}")
        if not (math.isfinite(self.tolerance) and 0 <= self.tolerance < 1):
            raise ConfigError("tolerance", f"must lie in [0, 1), got {self.tolerance}")
        for name in ("batch_size", "max_length", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"must be at least 1, got {self.limit}")
        from surgeon.anatomy.families import parse_modules

        parse_modules(self.modules)


@dataclass
class ProbeResult:
    """Per layer: the probes' loss (and accuracy); the unmasked/unswapped baselines; the plateau
    and the suggested ``--layers``."""

    num_layers: int
    baseline: dict[str, dict[str, float]]  # "text" / "images" -> {"loss", "accuracy"?, "n"}
    layers: list[dict[str, Any]]  # [{"layer": ℓ, "swap_loss": …, "mask_loss": …, …}]
    plateau: list[int] | None
    suggested_layers: str | None
    notes: list[str] = field(default_factory=list)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "output"}


def probe_layers(config: ProbeConfig, progress: Progress | None = None, status: Callable[[str], None] | None = None) -> ProbeResult:
    """Run the probes of ``config`` (see the module docstring); writes ``config.output`` (surgeon.json,
    layers.png) when given."""
    from surgeon.io.output import check_output
    from surgeon.modules.folders import load_eval_model

    say = status or (lambda text: None)
    if config.output:
        check_output(config.output, config.overwrite, [config.vlm, config.reasoning, config.data, config.image_data])
    swap = _SwapSource(config) if "swap" in config.probes else None  # alignment checked before the model loads
    encoder = _encoder(config)
    sets = _sets(config, encoder)
    say(f"loading {config.vlm}")
    model = load_eval_model(config.vlm, config.device, config.dtype)
    run = _Runner(model, encoder, config, progress)
    baseline: dict[str, dict[str, float]] = {}
    rows: dict[int, dict[str, Any]] = {}
    notes: list[str] = list(swap.notes) if swap else []
    if swap is not None:
        baseline["text"] = run.measure(sets["text"], "text")
        for layer in swap.layers:
            with swap.applied(model, layer, config.weight):
                found = run.measure(sets["text"], f"swap layer {layer}")
            rows.setdefault(layer, {"layer": layer}).update({f"swap_{k}": v for k, v in found.items() if k != "n"})
    if "mask-vision" in config.probes:
        from surgeon.evaluation.masking import VisionMask

        with VisionMask(model, encoder.placeholder_ids) as mask:
            notes += sorted(set(mask.notes))[:1]
            baseline["images"] = run.measure(sets["images"], "images")
            for layer in range(mask.num_layers):
                mask.start = layer
                found = run.measure(sets["images"], f"mask-vision from layer {layer}")
                rows.setdefault(layer, {"layer": layer}).update({f"mask_{k}": v for k, v in found.items() if k != "n"})
            mask.start = None
    num_layers = _num_layers(model)
    table = [rows[k] for k in sorted(rows)]
    plateau = _plateau(table, baseline, config.tolerance, notes) if "mask-vision" in config.probes else None
    result = ProbeResult(num_layers, baseline, table, plateau, _suggest(table, baseline, plateau), notes)
    if config.output:
        result.output = _write(result, config)
    return result


# ---------------------------------------------------------------------------------- the sets


def _encoder(config: ProbeConfig) -> Any:
    """The VLM's processor; for the swap probe alone (text rows), its tokenizer will do when the
    folder has no image processor."""
    from surgeon.data.encoding import SampleEncoder

    try:
        return SampleEncoder.from_pretrained(config.vlm, max_length=config.max_length)
    except DataError:
        if "mask-vision" in config.probes:
            raise
        from transformers import AutoConfig, AutoTokenizer

        from surgeon.anatomy.layout import placeholder_token_ids

        try:
            tokenizer = AutoTokenizer.from_pretrained(config.vlm)
            ids = placeholder_token_ids(AutoConfig.from_pretrained(config.vlm).to_dict()).values()
        except (OSError, ValueError):
            raise DataError(config.vlm, "has neither a processor nor a tokenizer that loads", "give a model folder with its tokenizer files") from None
        return SampleEncoder(tokenizer, config.max_length, ids, name=config.vlm)


def _sets(config: ProbeConfig, encoder: Any) -> dict[str, list[Any]]:
    """The encoded probe sets: ``text`` (text-only rows of data), ``images`` (rows with images)."""
    from surgeon.data.scan import scan_samples

    def read(path: str, want_images: bool) -> list[Any]:
        scanned = scan_samples(path, skip_bad=True, supervised=True)
        with_images = set(scanned.with_images)
        picked = [i for i in range(len(scanned)) if (i in with_images) == want_images]
        return [scanned.sample(i) for i in picked[: config.limit]]

    out: dict[str, list[Any]] = {}
    if "swap" in config.probes:
        out["text"] = read(config.data, False)
        if not out["text"]:
            raise DataError(config.data, "has no text-only row for the swap probe", "add rows without images (the swap probe measures reasoning on text)")
    if "mask-vision" in config.probes:
        source = config.image_data or config.data
        out["images"] = read(source, True)
        if not out["images"]:
            raise DataError(source, "has no row with an image for the mask-vision probe", "give --image-data with image rows, or --probe swap")
        if not encoder.has_images:
            raise ConfigError("vlm", f"{config.vlm} has no image processor, so it cannot read the image rows", "give a VLM folder with its processor")
    return out


class _Runner:
    """Loss (and accuracy) of the model as it is now, on one probe set."""

    def __init__(self, model: Any, encoder: Any, config: ProbeConfig, progress: Progress | None) -> None:
        self.model, self.encoder, self.config, self.progress = model, encoder, config, progress
        self.device = next(model.parameters()).device
        self.keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.encoded: dict[int, list[Any]] = {}

    @torch.no_grad()
    def measure(self, samples: list[Any], task: str) -> dict[str, float]:
        if id(samples) not in self.encoded:
            self.encoded[id(samples)] = [self.encoder.encode(s) for s in samples]
        encoded = self.encoded[id(samples)]
        total, count = 0.0, 0
        size = self.config.batch_size
        for start in range(0, len(encoded), size):
            nll, n = self._loss(self.encoder.collate(encoded[start : start + size]))
            total, count = total + nll, count + n
            if self.progress:
                self.progress(task, min(start + size, len(encoded)), len(encoded))
        out = {"loss": total / max(count, 1), "n": float(len(encoded))}
        if self._accuracy(samples):
            out["accuracy"] = self._score(samples)
        return out

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        labels = batch.pop("labels")
        batch.pop("perception_mask", None)
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        targets = labels[:, 1:]
        positions = (targets != IGNORE).any(0).nonzero().squeeze(1)
        if self.keep:
            logits = self.model(**inputs, logits_to_keep=positions.to(self.device)).logits
        else:
            logits = self.model(**inputs).logits[:, positions.to(self.device)]
        picked = targets[:, positions].to(logits.device)
        nll = F.cross_entropy(logits.float().flatten(0, 1), picked.flatten(), ignore_index=IGNORE, reduction="sum")
        return float(nll), int((picked != IGNORE).sum())

    def _accuracy(self, samples: list[Any]) -> bool:
        if self.config.accuracy is not None:
            return self.config.accuracy
        return any(s.meta.get("answer") is not None for s in samples)

    def _score(self, samples: list[Any]) -> float:
        from surgeon.evaluation.generate import item_from
        from surgeon.evaluation.run import score_model

        items = [item for s in samples if (item := item_from("probe", s)) is not None]
        rows = score_model(self.model, self.encoder, items, batch_size=self.config.batch_size, max_new_tokens=self.config.max_new_tokens)
        scored = [r["correct"] for r in rows if r["correct"] is not None]
        return sum(scored) / len(scored) if scored else float("nan")


# ---------------------------------------------------------------------------------- swapping


class _SwapSource:
    """The reasoning model's layers as Δ = θ_reasoning − θ_VLM, read one layer at a time from both
    checkpoints (paired as ``surgeon prior`` pairs them)."""

    def __init__(self, config: ProbeConfig) -> None:
        from surgeon.anatomy.align import align
        from surgeon.anatomy.families import Selection, parse_modules
        from surgeon.anatomy.layout import layer_index
        from surgeon.hub.sources import open_checkpoint

        self.reasoning = open_checkpoint(config.reasoning)  # type: ignore[arg-type]
        al = align(open_checkpoint(config.vlm), self.reasoning)
        self.vlm = al.vlm  # quantized weights read as their values
        pairs = al.select(Selection(parse_modules(config.modules)))
        self.llm = al.llm
        self.by_layer: dict[int, list[Any]] = {}
        outside = [p for p in pairs if layer_index(p.relative) is None]
        for pair in pairs:
            if (i := layer_index(pair.relative)) is not None:
                self.by_layer.setdefault(i, []).append(pair)
        if not self.by_layer:
            raise ConfigError("modules", f"{config.modules} selects no tensor inside a decoder layer", "select layer modules, e.g. attn,mlp")
        self.layers = sorted(self.by_layer)
        self.notes = [f"the swap probe replaces decoder layers only; {len(outside)} selected tensors outside them are left alone"] if outside else []

    def applied(self, model: Any, layer: int, weight: float) -> Any:
        return _Swapped(self, model, layer, weight)


class _Swapped:
    """Layer ``layer`` of ``model`` moved toward the reasoning model for the duration of a block,
    then restored bit for bit from the copies of that layer alone."""

    def __init__(self, source: _SwapSource, model: Any, layer: int, weight: float) -> None:
        self.source, self.model, self.layer, self.weight = source, model, layer, weight
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def __enter__(self) -> None:
        from surgeon.anatomy.decoder import lm_parameters
        from surgeon.drift.bias import prior_deltas

        parameters = dict(lm_parameters(self.model, buffers=True))  # buffers too: e.g. a router's correction bias
        live = _LiveDelta(self.source, self.source.by_layer[self.layer])
        for _, param, delta, _ in prior_deltas(live, parameters):
            self.saved.append((param, param.detach().clone()))
            param.copy_((param.float() + self.weight * delta.to(param.device, torch.float32)).to(param.dtype))
        if not self.saved:  # never a pass that swapped nothing
            raise ConfigError("vlm", f"layer {self.layer}'s tensors were not found in the loaded model", "report this model; the checkpoint and its loaded form differ")

    @torch.no_grad()
    def __exit__(self, *exc: object) -> None:
        for param, original in self.saved:
            param.copy_(original)
        self.saved = []


class _LiveDelta:
    """Δ of some pairs, computed as it is read (the interface ``prior_deltas`` reads a prior through)."""

    def __init__(self, source: _SwapSource, pairs: list[Any]) -> None:
        self.source = source
        self.pairs = {p.vlm_name: p for p in pairs}
        self.names = list(self.pairs)

    def relative(self, name: str) -> str:
        return self.pairs[name].relative

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.pairs[name].shape)

    def vlm_norm(self, name: str) -> float:
        return 0.0

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        pair = self.pairs[name]
        vlm = self.source.vlm.read(name, stop - start, start).float()
        shared = min(stop, pair.rows if pair.rows is not None else stop)
        out = torch.zeros_like(vlm)
        if shared > start:
            out[: shared - start] = self.source.llm.read(pair.llm_name, shared - start, start).float() - vlm[: shared - start]
        return out


# ---------------------------------------------------------------------------------- reading the curves


def _num_layers(model: Any) -> int:
    from surgeon.anatomy.decoder import lm_parameters
    from surgeon.anatomy.layout import layer_index

    return 1 + max((i for n, _ in lm_parameters(model) if (i := layer_index(n)) is not None), default=-1)


def _plateau(table: list[dict], baseline: dict, tolerance: float, notes: list[str]) -> list[int] | None:
    """The layers from the first one after which masking the images no longer moves the image loss
    by more than ``tolerance`` of the whole effect (masking from layer 0)."""
    curve = [(row["layer"], row["mask_loss"]) for row in table if "mask_loss" in row]
    if not curve:
        return None
    unmasked = baseline["images"]["loss"]
    effect = curve[0][1] - unmasked
    if effect <= 0:
        notes.append("hiding the images from every layer does not raise the image loss: this set does not need its images, so no plateau is found")
        return None
    start = len(curve)
    for i in range(len(curve) - 1, -1, -1):
        if abs(curve[i][1] - unmasked) > tolerance * effect:
            break
        start = i
    return [layer for layer, _ in curve[start:]] or None


def _suggest(table: list[dict], baseline: dict, plateau: list[int] | None) -> str | None:
    """A ``--layers`` range (see the module docstring)."""
    from surgeon.anatomy.families import format_layers

    swaps = {row["layer"]: row["swap_loss"] for row in table if "swap_loss" in row}
    calm = None
    if swaps:
        median = sorted(swaps.values())[(len(swaps) - 1) // 2]
        calm = {layer for layer, loss in swaps.items() if loss <= median}
    if plateau is None:
        return format_layers(calm) if calm else None
    both = [layer for layer in plateau if calm is None or layer in calm]
    return format_layers(both or plateau)


def _write(result: ProbeResult, config: ProbeConfig) -> str:
    from surgeon.io.output import output_folder
    from surgeon.io.provenance import build_record, write_record

    with output_folder(config.output, config.overwrite) as tmp:  # type: ignore[arg-type]
        if plot(result, tmp / "layers.png") is None:
            result.notes.append("no layers.png: matplotlib is not installed (pip install 'surgeon[plot]')")
        inputs = {"vlm": {"source": config.vlm}, "data": {"source": config.data}}
        if config.reasoning:
            inputs["reasoning"] = {"source": config.reasoning}
        if config.image_data:
            inputs["image_data"] = {"source": config.image_data}
        write_record(tmp, build_record("probe-layers", "layer-probe", asdict(config), inputs, result.to_dict(), methods=("layer-probes",)))
    return str(config.output)


def plot(result: ProbeResult, path: Path) -> Path | None:
    """Both curves against the layer: the swap's text loss, the mask-vision image loss, the
    baselines dashed and the plateau shaded; None without matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in (("swap_loss", "swap: text loss, layer ℓ from the reasoning model"),
                                              ("mask_loss", "mask-vision: image loss, images hidden from layer ℓ on")) if any(key in r for r in result.layers)]  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.0, 2.8 * len(panels)), squeeze=False, sharex=True)
    for ax, (key, title) in zip(axes[:, 0], panels):
        xs = [r["layer"] for r in result.layers if key in r]
        ax.plot(xs, [r[key] for r in result.layers if key in r], marker="o", markersize=3)
        base = result.baseline.get("text" if key == "swap_loss" else "images", {}).get("loss")
        if base is not None:
            ax.axhline(base, linestyle="--", color="grey", linewidth=1, label="unchanged model")
        if key == "mask_loss" and result.plateau:
            ax.axvspan(result.plateau[0] - 0.5, result.plateau[-1] + 0.5, color="tab:green", alpha=0.12, label="plateau")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("decoder layer ℓ" + (f"   (suggested --layers {result.suggested_layers})" if result.suggested_layers else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
