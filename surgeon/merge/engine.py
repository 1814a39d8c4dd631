"""``surgeon merge``: stream a VLM and reasoning LLMs into a merged, complete VLM folder.

    result = merge_models(MergeConfig(reasoning=("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",),
                                      vlm="Qwen/Qwen2.5-VL-7B-Instruct", output="merged",
                                      method="task-arithmetic", weight=0.5))

The output holds every tensor of the VLM, under the same names, shapes and dtypes, in the same
order: selected paired language-model tensors are merged by the method (fp32 arithmetic, streamed
through ``surgeon.io.streaming``); every other tensor (vision tower, projector, unpaired or
unselected LM tensors, the VLM's extra vocabulary rows) is copied byte for byte. Config,
generation config, tokenizer, processor and chat-template files are copied, so the folder loads
with ``from_pretrained``. Peak memory is a few blocks of 8M elements whatever the model size;
TIES reads each tensor three times (two passes find its exact magnitude threshold), the other
methods once.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from surgeon.anatomy.align import Alignment, Pair, align
from surgeon.io.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, Checkpoint
from surgeon.hub.sources import open_checkpoint
from surgeon.errors import ConfigError, SelectionError
from surgeon.anatomy.families import SelectsTensors, Selection, family_examples, parse_selection
from surgeon.anatomy.layout import layer_index
from surgeon.merge.method import MergeMethod, TensorContext
from surgeon.merge.thresholds import MagnitudeThresholds, kept_count
from surgeon.io.output import DEFAULT_SHARD_SIZE, ShardedWriter, TensorSpec, check_output, output_folder, parse_size
from surgeon.io.provenance import FILE_NAME, build_record, write_record
from surgeon.io.requantize import Requantizer
from surgeon.io import streaming
from surgeon.io.streaming import BlockStream, Copy, Job

Progress = Callable[[str, int, int], None]
SKIPPED_FILES = {FILE_NAME, "README.md", INDEX_NAME}
FUSED_DTYPES = {"BF16", "F16", "F32"}


@dataclass(frozen=True)
class MergeConfig(SelectsTensors):
    """Options of ``surgeon merge``; each CLI option is one field.

    ``weight`` / ``density`` / ``seed``: None means the method's default; giving one the method
    does not use is an error. ``modules`` / ``layers`` / ``skip_first`` / ``bias`` select the
    paired tensors to merge (default: all of them); ``layer-swap`` needs ``layers``. ``modules``
    and ``layers`` may be given as text (``"attn,mlp"``, ``"0-13"``), ``shard_size`` as ``"5GB"``.
    """

    reasoning: tuple[str, ...]
    vlm: str
    output: str
    method: str
    weight: float | None = None
    density: float | None = None
    seed: int | None = None
    modules: tuple[str, ...] = ("full",)
    layers: tuple[int, ...] | None = None
    skip_first: int = 0
    bias: bool = True
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    requantize: bool = False  # a quantized FP8 VLM: write its scheme back (new scales) instead of bf16 values

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasoning", (self.reasoning,) if isinstance(self.reasoning, str) else tuple(self.reasoning))
        parse_selection(self)
        object.__setattr__(self, "shard_size", parse_size(self.shard_size))


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_models`` wrote (also in the output's ``surgeon.json``)."""

    output: str
    method: str
    params: dict[str, float | int | str]
    selection: str
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    bytes: int = 0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_method(config: MergeConfig) -> tuple[MergeMethod, dict[str, float | int]]:
    """The method and its parameters (given or default). ConfigError for anything it cannot use."""
    from surgeon.merge import METHODS

    method = METHODS.get(config.method)
    if method is None:
        raise ConfigError("method", f"unknown merge method {config.method!r}", f"choose from {', '.join(METHODS)}")
    params: dict[str, float | int] = {}
    for opt in ("weight", "density", "seed"):
        given = getattr(config, opt)
        if given is not None and opt not in method.options:
            users = [n for n, m in METHODS.items() if opt in m.options]
            raise ConfigError(opt, f"is not used by {method.name}", f"leave it out, or choose {', '.join(users)}")
        if opt in method.options:
            params[opt] = given if given is not None else method.defaults[opt]
    if "weight" in params and not math.isfinite(float(params["weight"])):
        raise ConfigError("weight", f"must be a finite number, got {params['weight']}")
    if "density" in params and not 0 < float(params["density"]) <= 1:
        raise ConfigError("density", f"must be in (0, 1], got {params['density']}")
    if not config.reasoning:
        raise ConfigError("reasoning", "no reasoning model given")
    if method.single_model and len(config.reasoning) != 1:
        raise ConfigError("reasoning", f"{method.name} takes exactly one reasoning model, got {len(config.reasoning)}")
    if method.layers_only and not config.layers:
        raise ConfigError("layers", f"{method.name} needs the decoder layers to swap", "give a range, e.g. --layers 14-27")
    return method, params


def merge_models(config: MergeConfig, progress: Progress | None = None) -> MergeResult:
    """Merge ``config.reasoning`` into ``config.vlm`` with ``config.method``; write ``config.output``.

    Raises ConfigError, AlignmentError, SelectionError or OutputExistsError before writing anything.
    """
    method, params = resolve_method(config)
    check_output(config.output, config.overwrite, [config.vlm, *config.reasoning])
    tick = progress or (lambda task, done, total: None)
    with ExitStack() as open_:
        vlm = open_.enter_context(open_checkpoint(config.vlm))
        models = [open_.enter_context(open_checkpoint(r)) for r in config.reasoning]
        alignments = [align(vlm, m) for m in models]
        for source, al in zip(config.reasoning, alignments):
            if al.vlm_layout.kind == "llm" and al.llm_layout.kind == "vlm":
                raise ConfigError("vlm", f"{config.vlm} is a text LLM and {source} is a VLM", "did you swap --vlm and --reasoning?")
        plan, notes = _plan(alignments, config.selection, method)
        values = alignments[0].vlm  # the VLM read as values (a Dequantized view when it is quantized)
        notes += _quantized_notes(config, values)
        return _write(config, method, params, values, models, plan, alignments, notes, tick)


def _quantized_notes(config: MergeConfig, values: Any) -> list[str]:
    """What happens to a quantized VLM's weights; ConfigError for a --requantize that cannot be kept."""
    scheme = getattr(values, "scheme", None)
    if scheme is None:
        if config.requantize:
            raise ConfigError("requantize", f"{config.vlm} is not quantized", "leave out --requantize")
        return []
    if not config.requantize:
        return [f"{config.vlm} is quantized ({scheme.describe()}): its weights were merged as their values and written in "
                f"{scheme.logical_dtype} without quantization_config (--requantize writes its FP8 scheme back)"]  # fmt: skip
    if any(q.kind != "float" for q in scheme.tensors.values()):
        raise ConfigError("requantize", f"{config.vlm} holds integer-quantized weights ({scheme.describe()}); --requantize writes FP8 schemes only",
                          "leave out --requantize for a bf16 output")  # fmt: skip
    return [f"{config.vlm} is quantized ({scheme.describe()}): merged weights were quantized back with new scales, "
            "unmerged ones copied as stored, and quantization_config kept"]  # fmt: skip


def _plan(alignments: list[Alignment], selection: Selection, method: MergeMethod) -> tuple[dict[str, list[Pair]], list[str]]:
    """VLM name -> the pair with each reasoning model, for every selected tensor all of them have."""
    first = alignments[0]
    chosen = first.select(selection)
    if method.layers_only:
        chosen = [p for p in chosen if layer_index(p.relative) is not None]
        if not chosen:
            raise SelectionError("decoder-layer selection", selection.describe(), family_examples(p.relative for p in first.pairs))
    others = [{p.relative: p for p in al.pairs} for al in alignments[1:]]
    plan: dict[str, list[Pair]] = {}
    missing = 0
    for p in chosen:
        found = [o.get(p.relative) for o in others]
        if all(found):
            plan[p.vlm_name] = [p, *found]  # type: ignore[list-item]
        else:
            missing += 1
    notes = [n for al in alignments for n in al.notes]
    if missing:
        notes.append(f"{missing} selected tensor(s) are missing from some reasoning model and were copied unchanged")
    return plan, notes


def _write(
    config: MergeConfig, method: MergeMethod, params: dict, vlm: Checkpoint, models: list[Checkpoint],
    plan: dict[str, list[Pair]], alignments: list[Alignment], notes: list[str], tick: Progress,
) -> MergeResult:  # fmt: skip
    scheme = getattr(vlm, "scheme", None)
    requant = scheme is not None and config.requantize
    written = vlm.stored.tensors if requant else vlm.tensors  # requantized: the stored tensors, scales included
    quantized = scheme.tensors if scheme is not None else {}
    specs = [TensorSpec(n, scheme.logical_dtype if n in quantized and not requant else i.dtype, i.shape) for n, i in written.items()]
    with output_folder(config.output, config.overwrite) as tmp:
        files = _copy_side_files(vlm.path, tmp, keep_quantization=requant or scheme is None)
        # TIES' threshold search and sign election are compute-bound: every core takes tiles, one
        # intra-op thread each, tiles 4x the usual size (fewer calls per element: 1.3x faster on
        # the 1.5B pair); elementwise methods are memory-bound and keep a core for I/O
        stream_options = {"threads": 1, "workers": torch.get_num_threads(), "tile_elements": 4 * streaming.TILE_ELEMENTS}
        with ShardedWriter(tmp, specs, config.shard_size) as writer, BlockStream(**(stream_options if method.trims else {})) as stream:
            target: Any = Requantizer(writer, scheme, vlm.stored) if requant else writer
            jobs: list[Job | Copy] = []
            merged = 0
            owner = {q.scale: q.name for q in quantized.values()} if requant else {}
            for name, info in written.items():
                pairs = plan.get(name)
                if owner.get(name) in plan:
                    continue  # the scale of a merged weight: the Requantizer writes it with the weight
                if pairs is None and name in quantized and not requant:  # an unmerged quantized weight: its values
                    jobs.append(Job([(vlm, name)], info.shape, lambda x: x[0], out=(writer, name)))
                elif pairs is None:
                    jobs.append(Copy(writer, name, vlm.handle(info.file), info.start))
                else:
                    merged += 1
                    views = [al.llm for al in alignments]  # the reasoning models, experts in the VLM's layout
                    jobs += _merge_jobs(target, method, params, vlm, views, pairs, partial(tick, "merge", merged, len(plan)))
            tick("merge", 0, len(plan))
            stream.run(jobs)
            nbytes = writer.total_size
        al = alignments[0]
        counts = {
            "merged": len(plan),
            "copied": len(vlm.tensors) - len(plan),
            "vision": len(al.vision),
            "matched": len(al.pairs),
            "skipped": len(al.pairs) - len(plan),
            "unmatched_lm": len(al.unmatched_lm),
            "llm_only": len(al.llm_only),
        }
        result = MergeResult(
            output=str(config.output), method=method.name, params={"formula": method.summary, **params},
            selection=config.selection.describe(), counts=counts, notes=notes, bytes=nbytes, files=files,
        )  # fmt: skip
        stats = {k: v for k, v in result.to_dict().items() if k != "output"}
        resolved = replace(config, **params)  # the defaults the method used, not None
        write_record(tmp, build_record("merge", "model", resolved, {"vlm": vlm, "reasoning": list(models)}, stats, methods=("merge", config.method)))
    return result


def _copy_side_files(src: Path, dst: Path, keep_quantization: bool = True) -> list[str]:
    """Copy config, tokenizer, processor, chat-template and generation files (every top-level
    file that is not weights, a pickle, an index, a model card or a surgeon record). Without
    ``keep_quantization``, config.json loses its ``quantization_config`` (the weights are written
    unquantized)."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in SKIPPED_FILES:
            continue
        if f.suffix == ".safetensors" or f.name.endswith(".safetensors.index.json") or f.suffix in PICKLE_SUFFIXES:
            continue
        if f.name == "config.json" and not keep_quantization:
            config = json.loads(f.read_text())
            for part in (config, *(v for v in config.values() if isinstance(v, dict))):
                part.pop("quantization_config", None)
            (dst / f.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(f, dst / f.name)
        copied.append(f.name)
    return copied


def _seed(seed: int, model: int, relative: str) -> int:
    """A stable 63-bit seed per (seed, reasoning model, tensor): independent of tensor order."""
    digest = hashlib.sha256(f"{seed}|{model}|{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _merge_jobs(
    writer: ShardedWriter, method: MergeMethod, params: dict, vlm: Checkpoint, models: list[Checkpoint],
    pairs: list[Pair], done: Callable[[], None],
) -> list[Job]:  # fmt: skip
    """The streaming jobs that merge one tensor: TIES' two threshold passes when the method trims,
    the merge itself over the paired rows, and the VLM's extra rows copied unchanged."""
    first = pairs[0]
    name, shape = first.vlm_name, first.shape
    rows = [p.rows for p in pairs if p.rows is not None]
    shared = min(rows) if rows else None
    weight, density = float(params.get("weight", 1.0)), float(params.get("density", 1.0))
    sources = [(vlm, name)] + [(m, p.llm_name) for m, p in zip(models, pairs)]
    generators: tuple[torch.Generator, ...] = ()
    if method.random:
        generators = tuple(torch.Generator().manual_seed(_seed(int(params["seed"]), i, first.relative)) for i in range(len(pairs)))
    ctx = TensorContext(first.relative, weight, density, (), generators)
    guard = _FiniteGuard(name, sources, shared)
    jobs: list[Job] = []
    parallel = not method.random  # tiles in any order, on every core (random draws must keep their order)
    passes: list = []
    if method.trims:
        numel = math.prod(shape) if shared is None else shared * math.prod(shape[1:])
        k = kept_count(density, numel)
        select = MagnitudeThresholds(len(pairs), k)
        if k >= numel:
            select.values = (0.0,) * len(pairs)
        elif select.values is None:

            def taus(visit: Callable[[list[torch.Tensor]], None]) -> Callable[[torch.Tensor], None]:
                return lambda x: visit([o.sub_(x[0]) for o in x[1:]])

            passes = [(taus(select.count_high), select.pick), (taus(select.count_low), select.finish)]

        def combine(x: torch.Tensor) -> torch.Tensor:
            guard.add(x)
            return method.combine(x[0], list(x[1:]), replace(ctx, thresholds=select.values or ()))

        # TIES reads a tensor of up to two blocks' worth of elements once for its two threshold passes
        # and the merge (a 1.5B model's MLP weights, a 7B's attention weights; larger ones are read
        # once per pass), for about 200 MB more buffers
        jobs.append(Job(sources, shape, combine, out=(writer, name), stop=shared, done=guard.check, parallel=parallel,
                        passes=passes, block_elements=2 * streaming.BLOCK_ELEMENTS))  # fmt: skip
    else:
        dtypes = {ckpt.tensors[n].dtype for ckpt, n in sources}
        fused = method.fused if method.fused and len(pairs) == 1 and len(dtypes) == 1 and dtypes <= FUSED_DTYPES else None
        fn = fused or method.combine
        jobs.append(Job(sources, shape, lambda x: fn(guard.add(x)[0], list(x[1:]), ctx), out=(writer, name), stop=shared,
                        fp32=fused is None, done=guard.check))  # fmt: skip
    if shared is not None and shared < shape[0]:  # the VLM's extra rows: unchanged
        jobs.append(Job([(vlm, name)], shape, lambda x: x[0], out=(writer, name), start=shared, fp32=False))
    last = jobs[-1].done
    jobs[-1].done = done if last is None else (lambda: (last(), done()))  # type: ignore[func-returns-value]
    return jobs


class _FiniteGuard:
    """Sums the input tiles of a merged tensor as they stream by (one reduction over rows already
    in cache, accumulated in fp32 whatever the tiles' dtype; a NaN or Inf anywhere makes the sum
    non-finite, even where the method would drop that entry) and, when it is, reads the inputs to
    name the one that holds non-finite values. A sum that overflows while every input is finite
    (values near the dtype's limit) is no damage: the merge goes on."""

    def __init__(self, name: str, sources: list[tuple[Checkpoint, str]], rows: int | None) -> None:
        self.name, self.sources, self.rows = name, sources, rows
        self.total = torch.zeros((), dtype=torch.float64)
        self.lock = threading.Lock()  # tiles may be added from several threads

    def add(self, tiles: torch.Tensor) -> torch.Tensor:
        total = torch.sum(tiles, dtype=torch.float32).double()  # vectorised, and fp16 sums past 65504 stay finite
        with self.lock:
            self.total += total
        return tiles

    def check(self) -> None:
        if bool(torch.isfinite(self.total)):
            return
        from surgeon.errors import CheckpointError

        for ckpt, name in self.sources:  # only now, on failure: read the inputs to say which one
            t = ckpt.read(name, rows=self.rows)
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(ckpt.source, f"tensor {name} holds NaN or Inf values", _DAMAGED)


_DAMAGED = "the checkpoint is damaged or was saved after a diverged run: use an intact copy"
