"""DRIFT reasoning priors (docs/methods.md §1): compute Δ once, store it, load it for training.

    result = compute_prior(PriorConfig(reasoning="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
                                       vlm="Qwen/Qwen2.5-VL-7B-Instruct", output="r1-prior"))
    with open_prior("r1-prior") as prior:          # in the trainer, one tensor at a time
        for name in prior.names:                   # the VLM's on-disk names
            delta = prior.read(name)               # fp32, the VLM tensor's shape
            scale = prior.vlm_norm(name) / max(float(delta.norm()), 1e-12)   # optional normalisation

Single mode: Δ_m = θ_m(reasoning) − θ_m(VLM). Two-model mode (``base``): Δ_m = θ_m(reasoning) −
θ_m(base), attached to the VLM tensor of the same LM-relative name. Arithmetic is fp32, streamed
(``surgeon.io.streaming``: peak memory a few blocks, whatever the model size); Δ is stored raw, in
``dtype`` (default: the VLM's), as sharded safetensors under the VLM's tensor names, with
``surgeon.json`` holding per-tensor, per-layer and per-family statistics (``surgeon.drift.distance``),
each tensor's ‖θ_VLM‖, and the VLM's ``lm_prefix`` / ``lm_head``. The optional normalisation
Δ·‖θ_VLM‖/‖Δ‖ is left to training, which needs only this folder.

When vocabularies differ and embeddings or head are selected, Δ covers the shared leading rows
and is zero in the VLM's extra rows (``Prior.rows(name)`` says how many rows are paired).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from surgeon import dtypes
from surgeon.anatomy.align import Alignment, Pair, align
from surgeon.hub.repo_ids import REPO_ID
from surgeon.io.checkpoint import Checkpoint
from surgeon.hub.sources import open_checkpoint
from surgeon.drift.distance import Distance, summarise
from surgeon.errors import AlignmentError, CheckpointError, ConfigError
from surgeon.anatomy.families import SelectsTensors, DEFAULT_MODULES, parse_selection
from surgeon.anatomy.layout import layer_index
from surgeon.io.output import DEFAULT_SHARD_SIZE, ShardedWriter, TensorSpec, check_output, output_folder, parse_size
from surgeon.io.provenance import build_record, read_record, write_record
from surgeon.io.streaming import BlockStream, Job

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PriorConfig(SelectsTensors):
    """Options of ``surgeon prior``; each CLI option is one field.

    ``modules`` / ``layers`` / ``skip_first`` / ``bias`` form a ``families.Selection``
    (default ``attn,mlp`` with biases, every layer: the reference DRIFT default); ``modules`` and
    ``layers`` may be given as text (``"attn,mlp"``, ``"0-13"``), ``shard_size`` as ``"5GB"``.
    ``dtype`` is ``bf16`` / ``fp16`` / ``fp32`` or None for the VLM's dtype.
    """

    reasoning: str
    vlm: str
    output: str
    base: str | None = None
    modules: tuple[str, ...] = DEFAULT_MODULES
    layers: tuple[int, ...] | None = None
    skip_first: int = 0
    bias: bool = True
    dtype: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False

    def __post_init__(self) -> None:
        parse_selection(self)
        object.__setattr__(self, "shard_size", parse_size(self.shard_size))


@dataclass(frozen=True)
class PriorResult:
    """What ``compute_prior`` wrote and measured (also in the output's ``surgeon.json``)."""

    output: str
    mode: str
    dtype: str
    selection: str
    counts: dict[str, int]
    notes: list[str]
    tensors: dict[str, dict]
    layers: list[dict]
    families: list[dict]
    total: dict
    bytes: int = 0
    vlm_layout: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def compute_prior(config: PriorConfig, progress: Progress | None = None) -> PriorResult:
    """Compute and store the prior of ``config.reasoning`` (minus ``config.base`` or the VLM).

    Raises ConfigError (bad options, swapped inputs), AlignmentError (architectures differ),
    SelectionError (a module family or pattern matches nothing), OutputExistsError; in every
    such case before anything is written.
    """
    dtype = _dtype_code(config.dtype)
    check_output(config.output, config.overwrite, [config.reasoning, config.vlm, config.base])
    with ExitStack() as open_:
        vlm = open_.enter_context(open_checkpoint(config.vlm))
        reasoning = open_.enter_context(open_checkpoint(config.reasoning))
        base = open_.enter_context(open_checkpoint(config.base)) if config.base else None
        al = align(vlm, reasoning)
        _check_roles(al, config)
        pairs = al.select(config.selection)
        values = al.vlm  # quantized weights read as their values (surgeon.io.quantized)
        base_pairs, base_view = _base_pairs(values, base, pairs) if base else ({}, None)  # (align reads a quantized base as values)
        out_dtype = dtype or values.dtype
        with output_folder(config.output, config.overwrite) as tmp:
            specs = [TensorSpec(p.vlm_name, out_dtype, p.shape) for p in pairs]
            tick = progress or (lambda task, done, total: None)
            stats: dict[str, dict] = {}
            grouped: list[tuple[int | None, str, Distance]] = []
            with ShardedWriter(tmp, specs, config.shard_size) as writer, BlockStream() as stream:
                plans = [_DeltaPlan(writer, values, al.llm, p, base_view, base_pairs.get(p.relative)) for p in pairs]
                tick("prior", 0, len(plans))
                stream.run([job for i, plan in enumerate(plans, 1) for job in plan.jobs(partial(tick, "prior", i, len(plans)))])
            for plan in plans:
                plan.check_finite()
                pair, d = plan.pair, plan.distance()
                numbers = {k: v for k, v in d.to_dict().items() if k != "tensors"}
                layer = layer_index(pair.relative)
                stats[pair.vlm_name] = {"relative": pair.relative, "family": pair.family, "layer": layer, "rows": plan.shared, **numbers}
                grouped.append((layer, pair.family, d))
            layers, families, total = summarise(grouped)
            result = PriorResult(
                output=str(config.output),
                mode="two-model" if base else "single",
                dtype=out_dtype,
                selection=config.selection.describe(),
                counts=al.counts(pairs),
                notes=list(al.notes) + _base_notes(base_pairs),
                tensors=stats,
                layers=layers,
                families=families,
                total=total,
                bytes=writer.total_size,
                vlm_layout={"lm_prefix": al.vlm_layout.lm_prefix, "lm_head": al.vlm_layout.lm_head, "num_layers": al.vlm_layout.num_layers},
            )
            inputs: dict = {"reasoning": reasoning, "vlm": vlm, **({"base": base} if base else {})}
            recorded = {k: v for k, v in result.to_dict().items() if k != "output"}
            resolved = replace(config, dtype=dtypes.from_code(out_dtype) or config.dtype)  # the dtype used, not None
            write_record(tmp, build_record("prior", "prior", resolved, inputs, recorded, methods=("drift", "reasoning-prior")))
    return result


def _dtype_code(name: str | None) -> str | None:
    if name is None:
        return None
    return dtypes.code(dtypes.short(name))


def _check_roles(al: Alignment, config: PriorConfig) -> None:
    if al.vlm_layout.kind == "llm" and al.llm_layout.kind == "vlm":
        raise ConfigError(
            "vlm", f"{config.vlm} is a text LLM and reasoning model {config.reasoning} is a VLM", "did you swap --vlm and --reasoning?"
        )


def _base_pairs(vlm: Checkpoint, base: Checkpoint, pairs: list[Pair]) -> tuple[dict[str, Pair], Any]:
    """Two-model mode: the base model's counterpart of every selected pair (all must exist), and
    where to read them (the base, or a view of it serving its experts in the VLM's layout)."""
    bal = align(vlm, base)
    by_rel = {p.relative: p for p in bal.pairs}
    missing = [p.relative for p in pairs if p.relative not in by_rel]
    if missing:
        raise AlignmentError(
            f"base model {base.source} lacks {len(missing)} selected tensor(s)",
            missing,
            "give the base the reasoning model was trained from (same architecture), or narrow --modules",
        )
    return {p.relative: by_rel[p.relative] for p in pairs}, bal.llm


def _base_notes(base_pairs: dict[str, Pair]) -> list[str]:
    return [f"{p.relative}: the base model pairs its first {p.rows} rows" for p in base_pairs.values() if p.rows is not None]


def _shared_rows(pair: Pair, bpair: Pair | None) -> int | None:
    rows = [r for r in (pair.rows, bpair.rows if bpair else None) if r is not None]
    return min(rows) if rows else None


class _DeltaPlan:
    """The streaming jobs that write Δ for one pair, and the sums its statistics come from."""

    def __init__(
        self, writer: ShardedWriter, vlm: Checkpoint, reasoning: Checkpoint, pair: Pair, base: Checkpoint | None, bpair: Pair | None
    ) -> None:
        self.writer, self.vlm, self.pair = writer, vlm, pair
        self.shared = _shared_rows(pair, bpair)
        self.sources = [(reasoning, pair.llm_name), (vlm, pair.vlm_name)]
        if base is not None and bpair is not None:
            self.sources.append((base, bpair.llm_name))
        self.single = len(self.sources) == 2
        n = 2 if self.single else 4
        self.gram = torch.zeros(n, n, dtype=torch.float64)
        self.extra_sq = torch.zeros((), dtype=torch.float64)
        self.lock = threading.Lock()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """x = [θ(R), θ(VLM), (θ(base)), Δ] fp32 tile: Δ, and the Gram matrix of [θ(VLM), Δ]
        (single mode) or of all rows (two-model mode)."""
        torch.sub(x[0], x[-2], out=x[-1])
        rows = (x[1:] if self.single else x).flatten(1)
        gram = rows @ rows.T
        with self.lock:  # tiles may run on two threads
            self.gram.add_(gram)
        return x[-1]

    def zero(self, x: torch.Tensor) -> torch.Tensor:
        """VLM rows without counterpart: Δ = 0; they count in ‖θ_VLM‖."""
        v = x[0].flatten()
        sq = torch.dot(v, v)
        with self.lock:
            self.extra_sq.add_(sq)
        return x[0].zero_()

    def jobs(self, done: Callable[[], None]) -> list[Job]:
        """Δ over the paired rows, then zeros over the VLM's extra rows; ``done`` after the last."""
        name, shape = self.pair.vlm_name, self.pair.shape
        out = (self.writer, name)
        jobs = [Job(self.sources, shape, self.delta, out=out, stop=self.shared, extra=1, parallel=True)]
        if self.shared is not None and self.shared < shape[0]:
            jobs.append(Job([(self.vlm, name)], shape, self.zero, out=out, start=self.shared, parallel=True))
        jobs[-1].done = done
        return jobs

    def check_finite(self) -> None:
        """CheckpointError naming the tensor and the model when an input held NaN or Inf (the sums
        of squares behind the statistics are then not finite: a check that costs no extra pass)."""
        diag = torch.diagonal(self.gram)
        if bool(torch.isfinite(diag).all()) and bool(torch.isfinite(self.extra_sq)):
            return
        # single mode: the Gram rows are [θ_VLM, Δ = θ_R − θ_VLM]; two-model mode: [θ_R, θ_VLM, θ_base, Δ]
        vlm = self.sources[1]
        if not bool(torch.isfinite(self.extra_sq)):  # the VLM's rows without counterpart
            bad = vlm
        elif self.single:
            bad = vlm if not bool(torch.isfinite(diag[0])) else self.sources[0]
        else:
            bad = next((src for src, ok in zip(self.sources, torch.isfinite(diag[:3]).tolist()) if not ok), self.sources[0])
        raise CheckpointError(
            bad[0].source, f"tensor {bad[1]} holds NaN or Inf values",
            "the checkpoint is damaged or was saved after a diverged run: use an intact copy",
        )

    def distance(self) -> Distance:
        d = Distance(tensors=1)
        d.add_gram(self.gram, delta_from_vlm=self.single)
        d.add_vlm_sq(float(self.extra_sq))
        return d


class Prior:
    """A prior folder opened for training: read one Δ at a time.

    ``names``: the VLM's on-disk tensor names, in file order. ``relative(name)``: LM-relative
    name (``layers.3.mlp.up_proj.weight``, ``embed_tokens.weight``, ``lm_head.weight``).
    ``read(name)``: Δ as fp32, the VLM tensor's shape; ``read_rows(name, start, stop)``: some of its
    rows in the stored dtype. ``vlm_norm(name)``: ‖θ_VLM‖ of that tensor
    when the prior was made. ``rows(name)``: paired rows (None: all). ``record``: surgeon.json.
    """

    def __init__(self, path: str | Path) -> None:
        local = Path(path)
        if local.exists() or not REPO_ID.match(str(path)):
            self.record = _prior_record(local)
            self._ckpt = open_checkpoint(local)
        else:  # a Hub repo id: fetched through the cache like any checkpoint
            self._ckpt = open_checkpoint(str(path))
            self.record = _prior_record(self._ckpt.path, str(path))
        self.path = self._ckpt.path
        stats = self.record["stats"]
        self._tensors: dict[str, dict] = stats["tensors"]
        self.lm_prefix: str = stats["vlm_layout"]["lm_prefix"]
        self.lm_head: str | None = stats["vlm_layout"]["lm_head"]
        self.mode: str = stats["mode"]
        missing = [n for n in self._tensors if n not in self._ckpt.tensors]
        if missing:
            self._ckpt.close()
            raise CheckpointError(str(path), f"surgeon.json lists {len(missing)} tensor(s) the weights lack, e.g. {missing[0]}", "compute the prior again")
        self.names: list[str] = [n for n in self._ckpt.tensors if n in self._tensors]

    def relative(self, name: str) -> str:
        return self._tensors[name]["relative"]

    def read(self, name: str) -> torch.Tensor:
        return self._ckpt.read(name).float()

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start .. stop`` of Δ in its stored dtype, read straight from the file (a
        sharded trainer reads only the rows its shard of the parameter holds)."""
        return self._ckpt.read(name, rows=max(stop - start, 0), start=start)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._ckpt.tensors[name].shape

    def vlm_norm(self, name: str) -> float:
        return float(self._tensors[name]["vlm_norm"])

    def rows(self, name: str) -> int | None:
        return self._tensors[name]["rows"]

    def stats(self, name: str) -> dict:
        """The tensor's statistics (``delta_norm``, ``relative_distance``, ``cosine`` …)."""
        return dict(self._tensors[name])

    def close(self) -> None:
        self._ckpt.close()

    def __enter__(self) -> Prior:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Prior({str(self.path)!r}, {len(self.names)} tensors, {self.mode})"


def _prior_record(path: Path, source: str | None = None) -> dict:
    hint = "create one with: surgeon prior --reasoning LLM --vlm VLM -o OUT"
    source = source or str(path)
    if not path.is_dir():
        raise CheckpointError(source, "no such prior folder", hint)
    try:
        record = read_record(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(source, "has a surgeon.json that is not valid JSON", hint) from None
    if not isinstance(record, dict) or record.get("artifact") != "prior":
        what = "has no surgeon.json" if record is None else f"holds a surgeon {record.get('artifact', 'output')!r}, not a prior"
        raise CheckpointError(source, f"is not a prior ({what})", hint)
    return record


def open_prior(path: str | Path) -> Prior:
    """Open a folder written by ``compute_prior``. CheckpointError (one line) if it is not one."""
    return Prior(path)
