"""What one ``surgeon train`` run holds from its first step to its last, set up and closed here:

    s = open_session(config, state, cpu, status, on_step)   # folders, inputs, model, engine, optimiser, DRIFT, resume
    for step in range(s.start, s.total): …                  # surgeon.training.steps
        report(s, step, metrics)                            # metrics.jsonl, tracker, progress, checkpoints
    result = close_session(s)                               # the output folder; the checkpoint folder if it holds nothing

The order matters and is kept on every process: folders are checked before anything loads, the
main process changes them only after every process has checked them, and the memory plan is held
against the device before the model is read.
"""

from __future__ import annotations

import gc
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from surgeon.training.build import Run
from surgeon.training.config import Precision, TrainConfig
from surgeon.training.state import Progress

StepCallback = Callable[[dict[str, Any]], None]
Status = Callable[[str], None]


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the output folder, steps, last metrics, data and model facts."""

    output: str
    steps: int
    metrics: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)
    main_process: bool = True  # False on the other ranks of a multi-process run


@dataclass
class Session:
    """The objects a run's steps use and change (``surgeon.training.steps``)."""

    config: TrainConfig
    run: Run
    precision: Precision
    engine: Any  # surgeon.training.parallel.Replicated or Sharded
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    drift: Any  # surgeon.drift.bias.Drift or None
    dynamic: Any  # surgeon.perception.reweight.PerceptionGradients for dynamic λ, else None
    order: Any  # surgeon.training.order.SampleOrder
    total: int
    start: int
    progress: Progress
    root: Path  # OUTPUT-checkpoints
    loader: Iterator[Any]
    log: Any = None  # surgeon.training.tracking.MetricsLog on the main process
    tracker: Any = None
    on_step: StepCallback | None = None
    forward: Any = None  # surgeon.training.forward.Forward
    monitor: Any = None  # surgeon.evaluation.monitor.Monitor (--eval-every)
    status: Status = print
    metrics: dict[str, Any] = field(default_factory=dict)  # the last step's
    lr: float = 0.0  # the learning rate the last optimiser step used
    seen: dict[str, int] = field(default_factory=lambda: {"supervised_tokens": 0, "perception_tokens": 0, "hollow": 0, "samples": 0})


def open_session(config: TrainConfig, state: Any, cpu: bool, status: Status, on_step: StepCallback | None) -> Session:
    """Everything before the first step, in order: the dtype policy, the output and checkpoint
    folders, the inputs and the memory plan, data and model, the engine that places (or shards)
    the model, AdamW and its schedule, DRIFT, a resumed checkpoint, the metric sinks and the loader."""
    from accelerate.utils import set_seed

    from surgeon.training import build, inputs
    from surgeon.training.config import resolve_precision
    from surgeon.training.forward import Forward
    from surgeon.training.parallel import fsdp_requested

    precision = resolve_precision(config, not cpu and torch.cuda.is_bf16_supported())
    sharded = fsdp_requested(config.fsdp) and state.num_processes > 1
    if fsdp_requested(config.fsdp) and not sharded:
        status("one process: --fsdp has nothing to shard over, so this run trains unsharded")
    resume_from = _prepare_folders(config, state, status)
    set_seed(config.seed)
    checkpoint = inputs.check_inputs(config)
    inputs.check_memory(config, checkpoint, state.num_processes, sharded, precision, state.device)
    status("loading data and model")
    run = build.prepare(config, checkpoint, precision, sharded=sharded)
    _describe_data(run, status)
    if config.modules is not None or config.layers is not None:
        how = "trains" if config.full else "wraps with LoRA"
        n = sum(1 for name in run.trainable if config.full or name.endswith("lora_A.default.weight"))
        status(f"{how} {n} language-model {'tensors' if config.full else 'projections'} ({config.selection.describe()})")
    engine, model, order, total, optimizer, scheduler = _place(config, run, precision, sharded, state, cpu)
    drift = build.drift_for(run, config, _reduce(engine), 1.0 / engine.loss_scale)
    if drift is not None:
        zero = f"; {len(drift.zero)} tensors with Δ = 0 are left alone" if drift.zero else ""
        what = f"{len(drift.params)} tensors ({drift.numel:,} parameters)"
        if not config.full:
            what = f"the LoRA factors of {len(drift.names)} weights through their full-weight gradients ({drift.numel:,} adapter parameters)"
        status(f"DRIFT biases {what}, {config.drift_scale}, α={config.drift_alpha}{zero}")
    params = list(run.trainable.values())
    progress = Progress(0, config.fingerprint() + run.data_fingerprint, inputs.input_identities(run, config))
    monitor = _monitor(config, run, engine, model)  # (before a resumed checkpoint: the base is the model as loaded)
    start = _resume(config, resume_from, progress, run, optimizer, scheduler, engine, status)
    s = Session(
        config, run, precision, engine, model, params, optimizer, scheduler, drift, _dynamic(config, params), order, total, start, progress,
        root=_root(config), loader=_loader(config, run, order, engine.rank, start, total), on_step=on_step,
    )  # fmt: skip
    s.forward = Forward(model, config, engine, run.dataset.encoder.placeholder_ids, status)
    s.monitor, s.status = monitor, status
    _open_sinks(s)
    model.train()
    return s


def report(s: Session, step: int, metrics: dict[str, Any]) -> None:
    """After a step: its metrics to metrics.jsonl, the tracker and the progress callback (main
    process), and a checkpoint every ``--save-steps`` steps (every process takes part)."""
    from surgeon.training.state import prune_checkpoints, save_checkpoint
    from surgeon.training.tracking import numbers, tracker_tags

    if s.monitor is not None and s.monitor.due(step + 1, s.total):
        found = s.monitor(s.engine.unwrap(s.model))
        metrics = {**metrics, **found}
        s.status(f"eval after step {step + 1}: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in found.items() if not k.endswith("/n")))
    s.metrics = metrics
    s.seen["supervised_tokens"] += metrics["perception_tokens"] + metrics["reasoning_tokens"]
    s.seen["perception_tokens"] += metrics["perception_tokens"]
    s.seen["hollow"] += metrics.get("skipped_samples", 0)
    s.seen["samples"] += metrics.get("samples", 0)
    _check_skipped(s, metrics)
    if s.log is not None:
        s.log.write(metrics)
    if s.tracker is not None:
        s.tracker.log(tracker_tags(numbers(metrics)), step=step + 1)
    if s.on_step is not None and s.engine.is_main:
        s.on_step(metrics)
    if s.config.save_steps and (step + 1) % s.config.save_steps == 0 and step + 1 < s.total:
        save_checkpoint(s.root / f"checkpoint-{step + 1}", replace(s.progress, step=step + 1), s.run.trainable, s.optimizer, s.scheduler, s.engine)
        s.engine.barrier()
        if s.config.save_total_limit and s.engine.is_main:
            for removed in prune_checkpoints(s.root, s.config.save_total_limit):
                s.status(f"removed {removed.name} (--save-total-limit {s.config.save_total_limit})")
        s.engine.barrier()


SKIP_SAMPLE = 64  # samples seen before the skipped share is judged mid-run


def _check_skipped(s: Session, metrics: dict[str, Any]) -> None:
    """Stop (on every process alike) when the samples skipped so far pass --max-skipped-share
    (judged once ``SKIP_SAMPLE`` samples were seen, and at the last step), or when the run ends
    having trained on no token at all."""
    from surgeon.errors import DataError

    seen, share = s.seen, s.config.max_skipped_share
    why = "; ".join(metrics.get("skipped_because", [])) or "see the data line of the status"
    judged = seen["samples"] >= SKIP_SAMPLE or metrics["step"] == s.total  # not on a handful of samples, but always at the end
    if judged and seen["samples"] and seen["hollow"] / seen["samples"] > share:
        raise DataError(
            str(s.config.data), f"{seen['hollow']} of the {seen['samples']} samples so far were skipped ({why}), more than "
            f"--max-skipped-share {share:g}", "raise --max-length, fix those lines, or raise --max-skipped-share",
        )  # fmt: skip
    if metrics["step"] == s.total and seen["supervised_tokens"] == 0:
        raise DataError(str(s.config.data), f"the run trained on no token: {seen['hollow']} of {seen['samples']} samples were skipped "
                        f"and the rest carry no answer tokens ({why})", "check --max-length and that rows have assistant turns")  # fmt: skip


def close_session(s: Session) -> TrainResult:
    """After the last step: the run's statistics, the optimiser state freed, the trained model
    gathered and written as the output folder (with the metrics), the checkpoint folder removed
    when it holds no checkpoint."""
    from surgeon.training import save
    from surgeon.training.state import remove_root

    stats = _stats(s)
    s.optimizer.zero_grad(set_to_none=True)
    s.optimizer.state.clear()  # the moments (and Δ, below) are not needed for the output: free them first
    s.drift = s.dynamic = None
    final = save.output_model(s.run, s.model, s.config, s.precision, s.engine)
    if s.tracker is not None:
        s.tracker.finish()
    if s.log is not None:
        s.log.close()
        save.save_output(s.run, final, s.config, stats, s.root / "metrics.jsonl")
        remove_root(s.root)  # nothing to resume from: the metrics are in the output now
    s.engine.barrier()
    return TrainResult(s.config.output, s.total, s.metrics, stats, s.engine.is_main)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the parts


def _root(config: TrainConfig) -> Path:
    from surgeon.training.state import checkpoint_root

    return checkpoint_root(config.output)  # type: ignore[arg-type]


def _prepare_folders(config: TrainConfig, state: Any, status: Status) -> Path | None:
    """Check the output and the checkpoint folder on every process, then let the main one replace
    what it may and clean what a killed run left; returns the checkpoint ``--resume`` continues from."""
    from surgeon.errors import CheckpointError, ConfigError
    from surgeon.io.output import check_output
    from surgeon.training.state import check_root, chosen_checkpoint, remove_stale

    sources = [config.model, config.data, config.prior, config.image_lora]
    check_output(config.output, config.overwrite, sources)  # type: ignore[arg-type]
    root = _root(config)
    replace_root = check_root(config.output, sources, config.resume, config.overwrite)  # type: ignore[arg-type]
    resume_from = None
    if config.resume:
        resume_from, damaged = chosen_checkpoint(config.resume, root)
        if resume_from is None and not damaged:
            raise ConfigError("resume", f"no checkpoint in {root}", "run without --resume, or check --output")
        if resume_from is None:
            path, problem = damaged[0]
            raise CheckpointError(str(path), f"is damaged: {problem}", "no intact checkpoint is left to resume from: start over with --overwrite")
        for path, problem in damaged:
            status(f"{path.name} is damaged ({problem}); resuming from {resume_from.name} instead")
    state.wait_for_everyone()  # every process has checked the folders before the main one changes them
    if state.is_main_process and replace_root:
        shutil.rmtree(root)
    if state.is_main_process and root.exists():
        remove_stale(root)  # temporary checkpoint folders of a killed run (this run holds the output's claim)
    state.wait_for_everyone()
    return resume_from


def _describe_data(run: Run, status: Status) -> None:
    data = run.dataset.stats
    status(
        f"data: {data.used} of {data.read} samples used (checked without reading images; each is encoded when"
        f" its batch comes); skipped: {data.describe_skipped()}"
    )
    if "image_lora" in run.stats:
        il, flops = run.stats["image_lora"], run.stats["image_lora"]["flops"]
        status(
            f"Image-LoRA on {sum(map(len, il['heads']))} KV heads in {sum(1 for h in il['heads'] if h)} layers, "
            f"{il['parameters']:,} parameters; adapter FLOPs {flops['ratio']:.2%} of LoRA on v_proj over all tokens "
            f"(visual-token fraction of the data {flops['visual_fraction']:.2%})"
        )


def _place(config: TrainConfig, run: Run, precision: Precision, sharded: bool, state: Any, cpu: bool) -> tuple[Any, ...]:
    """(engine, model, sample order, total steps, optimiser, schedule): the model placed (or
    sharded) by its engine, AdamW over its trainable parameters, the cosine schedule."""
    from transformers import get_cosine_schedule_with_warmup

    from surgeon.dtensor import is_sharded
    from surgeon.training.lora import trainable
    from surgeon.training.parallel import Replicated, Sharded

    engine = Sharded(precision, state) if sharded else Replicated(precision, run.has_surgeon_modules, cpu)
    order = _order(config, run, engine)
    total = config.max_steps or max(1, math.ceil(config.epochs * order.steps_per_epoch))
    model = engine.shard(run.model)
    run.trainable = trainable(model)  # the sharded parameters (same names)
    gc.collect()  # drop the unsharded tensors now, and with them the checkpoint's file mapping
    params = list(run.trainable.values())
    # fused: one kernel per step instead of foreach temporaries the size of the model state; sharded
    # and replicated parameters in separate groups (one fused call cannot mix DTensors and tensors)
    fused = engine.device.type in ("cuda", "cpu")
    groups = [g for g in ([p for p in params if is_sharded(p)], [p for p in params if not is_sharded(p)]) if g]
    optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    model, optimizer = engine.wrap(model, optimizer)
    return engine, model, order, total, optimizer, scheduler


def _order(config: TrainConfig, run: Run, engine: Any) -> Any:
    """The global sample order: by samples (``SampleOrder``, grouped by length on request) or by
    tokens (``TokenBudgetOrder``). The lengths both need are measured once, each process encoding
    its share of the samples."""
    from surgeon.training.order import SampleOrder, TokenBudgetOrder

    if not (config.max_tokens_per_batch or config.group_by_length):
        return SampleOrder(len(run.dataset), config.batch_size, config.grad_accum, engine.world, config.seed)
    lengths = _lengths(config, run, engine)
    if config.max_tokens_per_batch:
        return TokenBudgetOrder(lengths, config.max_tokens_per_batch, config.grad_accum, engine.world, config.seed, packed=config.packing)
    return SampleOrder(len(run.dataset), config.batch_size, config.grad_accum, engine.world, config.seed, lengths, group_by_length=True)


def _lengths(config: TrainConfig, run: Run, engine: Any) -> tuple[int, ...]:
    from surgeon.data.loading import token_lengths

    n = len(run.dataset)
    mine = list(range(engine.rank, n, engine.world))
    counts = torch.zeros(n, dtype=torch.float64, device=engine.device)
    counts[mine] = torch.tensor(token_lengths(run.dataset, mine, config.num_workers), dtype=torch.float64, device=engine.device)
    return tuple(int(x) for x in engine.all_reduce(counts).tolist())


def _reduce(engine: Any) -> Any:
    """A sum over processes of a small CPU tensor (None on one process)."""
    if engine.world == 1:
        return None
    return lambda t: engine.all_reduce(t.to(engine.device)).cpu()


def _monitor(config: TrainConfig, run: Run, engine: Any, model: Any) -> Any:
    """The training-time evaluation (``--eval-every``), its base distributions taken now; None without it."""
    if not config.eval_every:
        return None
    from surgeon.evaluation.generate import item_from
    from surgeon.evaluation.monitor import KL_PROMPTS, Monitor

    scanned = run.dataset.scanned
    fallback = [i for k in range(min(len(scanned), 64)) if (i := item_from("train", scanned.sample(k))) is not None and not i.images]
    monitor = Monitor(
        config.eval_set, config.eval_every, run.dataset.encoder, config.eval_limit, config.eval_max_new_tokens,
        fallback=fallback[:KL_PROMPTS], reduce=engine.all_reduce, rank=engine.rank, world=engine.world, synced=engine.sharded,
    )  # fmt: skip
    monitor.start(engine.unwrap(model))
    return monitor


def _dynamic(config: TrainConfig, params: list[torch.nn.Parameter]) -> Any:
    from surgeon.perception.reweight import PerceptionGradients

    return PerceptionGradients(params) if config.perception_weight == "dynamic" else None


def _resume(
    config: TrainConfig, folder: Path | None, progress: Progress, run: Run, optimizer: Any, scheduler: Any, engine: Any, status: Status
) -> int:
    """The step to start from: 0, or the resumed checkpoint's (its state restored)."""
    from surgeon.training.state import load_checkpoint

    if not config.resume:
        return 0
    start = load_checkpoint(folder, progress, run.trainable, optimizer, scheduler, engine, config.resume_anyway, status)  # type: ignore[arg-type]
    status(f"resumed from {folder} at step {start}")
    return start


def _open_sinks(s: Session) -> None:
    """The checkpoint folder (marked as surgeon's), metrics.jsonl and the tracker, on the main process."""
    from surgeon.training.state import make_root
    from surgeon.training.tracking import MetricsLog, open_tracker

    if not s.engine.is_main:
        return
    make_root(s.root)
    s.log = MetricsLog(s.root / "metrics.jsonl", s.start)
    s.tracker = open_tracker(s.config.report_to, Path(s.config.output).name, s.root / "logs", asdict(s.config))  # type: ignore[arg-type]


def _loader(config: TrainConfig, run: Run, order: Any, rank: int, start: int, total: int) -> Iterator[Any]:
    """This process's micro-batches from step ``start`` on, in the global sample order."""
    from surgeon.data.loading import CountingCollate
    from surgeon.training.order import MicroBatches

    return iter(
        torch.utils.data.DataLoader(
            run.dataset, batch_sampler=MicroBatches(order, rank, start, total),
            collate_fn=CountingCollate(run.dataset.encoder, packed=config.packing), num_workers=config.num_workers,
        )
    )  # fmt: skip


def _stats(s: Session) -> dict[str, Any]:
    """What surgeon.json records of the run beside its settings."""
    stats = {**s.run.stats, "steps": s.total, "world_size": s.engine.world, "threads": torch.get_num_threads(),
             "global_batch": s.order.global_batch, "final": s.metrics, "seen": s.seen}  # fmt: skip
    stats["precision"] = {"mixed": s.precision.mixed, "trained": s.precision.master, "frozen": s.precision.frozen}
    stats["sharded"] = s.engine.sharded
    if s.drift is not None:
        d = s.drift
        stats["drift"] = {"tensors": len(d.params), "zero_delta": len(d.zero), "parameters": d.numel, "delta_bytes_per_process": d.local_bytes}
    return stats
