"""The training loop of ``surgeon train``: explicit, on Accelerate, exact under any batch split.

    result = train(TrainConfig(model="vlm/", data="data.jsonl", output="run/", max_steps=100))

One optimiser step::

    global batch  = batch_size × grad_accum × world_size samples (surgeon.training.order)
    token counts  = (N_p, N_r) over the whole global batch, all-reduced before any forward
    micro-batches : loss = λ·Σ_p ce/N_p + (1−λ)·Σ_r ce/N_r   (λ = N_p/(N_p+N_r) without reweighting:
                    plain token-averaged cross-entropy), backward; DDP syncs on the last one only
    dynamic λ     : ∇L_p and ∇L_r kept apart over the step, summed over ranks, λ from their norms
    DRIFT         : once, on the accumulated all-reduced gradient   (surgeon.drift.bias)
    clip, AdamW, cosine schedule with warmup

Because every loss is normalised by the global token counts and DRIFT sees the final gradient,
1 process × 2 accumulation steps and 2 processes × 1 step give the same update. Run it with
``surgeon train …`` on one device, or ``accelerate launch -m surgeon.commands train …`` /
``torchrun --nproc-per-node N -m surgeon.commands train …`` on several.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from surgeon.training.config import TrainConfig

StepCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the output folder, steps, last metrics, data and model facts."""

    output: str
    steps: int
    metrics: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)
    main_process: bool = True  # False on the other ranks of a multi-process run


def train(config: TrainConfig, on_step: StepCallback | None = None, on_status: Callable[[str], None] | None = None) -> TrainResult:
    """Run ``config`` to the end and write its output folder; ``on_step`` receives each step's metrics.

    The main process claims the output for the whole run (a second run writing it fails at once).
    Stopped by Ctrl-C or SIGTERM, it raises ``Interrupted`` saying which checkpoint is kept."""
    import contextlib

    from accelerate import PartialState

    from surgeon.errors import ConfigError, Interrupted
    from surgeon.io.output import claim
    from surgeon.training.parallel import default_threads, deepspeed_requested, return_freed_memory
    from surgeon.training.state import checkpoint_root, latest_intact
    from surgeon.training.tracking import check_tracker

    config.require_io()
    check_tracker(config.report_to)
    if deepspeed_requested():
        raise ConfigError("distributed", "surgeon train does not run under DeepSpeed", "shard with --fsdp (FSDP2) instead")
    # cpu=True on machines without CUDA, so that torchrun/accelerate launch gives a gloo process group
    cpu = not torch.cuda.is_available()
    if cpu:
        return_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or default_threads())
    state = PartialState(cpu=cpu)
    try:
        with claim(config.output) if state.is_main_process else contextlib.nullcontext():  # type: ignore[arg-type]
            return _train(config, state, cpu, on_step, on_status)
    except KeyboardInterrupt as exc:
        latest = latest_intact(checkpoint_root(config.output))[0]  # type: ignore[arg-type]
        kept = f"{latest} is kept; run the same command with --resume to continue from it" if latest else "no output was written"
        raise Interrupted(getattr(exc, "signum", 2), kept) from None
    finally:
        torch.set_num_threads(threads)


def _train(
    config: TrainConfig, state: Any, cpu: bool, on_step: StepCallback | None, on_status: Callable[[str], None] | None
) -> TrainResult:
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from surgeon.drift.bias import clip_grad_norm
    from surgeon.errors import ConfigError
    from surgeon.io.output import check_output
    from surgeon.perception.reweight import PerceptionGradients, combine, count_span_tokens, span_losses
    from surgeon.shards import is_sharded
    from surgeon.training import setup
    from surgeon.training.config import resolve_precision
    from surgeon.training.model import trainable
    from surgeon.data.loading import CountingCollate
    from surgeon.training.order import MicroBatches, SampleOrder
    from surgeon.training.parallel import Replicated, Sharded, fsdp_requested
    from surgeon.training.tracking import numbers, open_tracker
    from surgeon.errors import CheckpointError
    from surgeon.training.state import (
        Progress, check_root, checkpoint_root, latest_intact, load_checkpoint, make_root, remove_root, remove_stale, save_checkpoint,
    )  # fmt: skip

    status = on_status if (on_status is not None and state.is_main_process) else (lambda text: None)
    precision = resolve_precision(config, not cpu and torch.cuda.is_bf16_supported())
    sharded = fsdp_requested(config.fsdp) and state.num_processes > 1
    if fsdp_requested(config.fsdp) and not sharded:
        status("one process: --fsdp has nothing to shard over, so this run trains unsharded")
    inputs = [config.model, config.data, config.prior, config.image_lora]
    check_output(config.output, config.overwrite, inputs)  # type: ignore[arg-type]
    ckpt_root = checkpoint_root(config.output)  # type: ignore[arg-type]
    replace_root = check_root(config.output, inputs, config.resume, config.overwrite)  # type: ignore[arg-type]
    resume_from = None
    if config.resume:
        resume_from, damaged = latest_intact(ckpt_root)
        if resume_from is None and not damaged:
            raise ConfigError("resume", f"no checkpoint in {ckpt_root}", "run without --resume, or check --output")
        if resume_from is None:
            path, problem = damaged[0]
            raise CheckpointError(str(path), f"is damaged: {problem}", "no intact checkpoint is left to resume from: start over with --overwrite")
        for path, problem in damaged:
            status(f"{path.name} is damaged ({problem}); resuming from {resume_from.name} instead")
    state.wait_for_everyone()  # every process has checked the folders before the main one changes them
    if state.is_main_process and replace_root:
        shutil.rmtree(ckpt_root)
    if state.is_main_process and ckpt_root.exists():
        remove_stale(ckpt_root)  # temporary checkpoint folders of a killed run (this run holds the output's claim)
    state.wait_for_everyone()
    set_seed(config.seed)
    checkpoint = setup.check_inputs(config)
    setup.check_memory(config, checkpoint, state.num_processes, sharded, precision, state.device)
    status("loading data and model")
    run = setup.prepare(config, checkpoint, precision, sharded=sharded)
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
    engine = Sharded(precision, state) if sharded else Replicated(precision, run.has_surgeon_modules, cpu)
    world, rank = engine.world, engine.rank
    order = SampleOrder(len(run.dataset), config.batch_size, config.grad_accum, world, config.seed)
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
    drift = setup.drift_for(run, config)
    if drift is not None:
        zero = f"; {len(drift.zero)} tensors with Δ = 0 are left alone" if drift.zero else ""
        status(f"DRIFT biases {len(drift.params)} tensors ({drift.numel:,} parameters), {config.drift_scale}, α={config.drift_alpha}{zero}")
    dynamic = PerceptionGradients(params) if config.perception_weight == "dynamic" else None
    fingerprint = config.fingerprint() + run.data_fingerprint
    progress = Progress(0, fingerprint, setup.input_identities(run, config))

    start = 0
    if config.resume:
        start = load_checkpoint(resume_from, progress, run.trainable, optimizer, scheduler, engine, config.resume_anyway, status)  # type: ignore[arg-type]
        status(f"resumed from {resume_from} at step {start}")

    if engine.is_main:
        make_root(ckpt_root)
    log = _MetricsLog(ckpt_root / "metrics.jsonl", start) if engine.is_main else None
    tracker = open_tracker(config.report_to, Path(config.output).name, ckpt_root / "logs", asdict(config)) if engine.is_main else None  # type: ignore[arg-type]
    metrics: dict[str, Any] = {}
    seen = {"supervised_tokens": 0, "perception_tokens": 0, "hollow": 0}
    loader = iter(
        torch.utils.data.DataLoader(
            run.dataset, batch_sampler=MicroBatches(order, rank, start, total), collate_fn=CountingCollate(run.dataset.encoder),
            num_workers=config.num_workers,
        )
    )  # fmt: skip
    model.train()
    for step in range(start, total):
        started = time.perf_counter()
        fetched = [next(loader) for _ in range(config.grad_accum)]
        batches = [batch for batch, _ in fetched]
        counts = torch.tensor([[*count_span_tokens(b["labels"], b["perception_mask"]), len(h)] for b, h in fetched]).sum(0)
        n_p, n_r, hollow = (int(x) for x in engine.all_reduce(counts.to(engine.device)))
        lam = config.fixed_lambda if config.fixed_lambda is not None else n_p / max(n_p + n_r, 1)
        sums = torch.zeros(3, device=engine.device)  # L_p, L_r, tokens seen (this rank)
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1 and dynamic is None
            labels, mask = batch.pop("labels"), batch.pop("perception_mask")
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            with engine.sync(model, last):
                with engine.autocast():
                    logits = model(**batch).logits
                if not logits.requires_grad:  # a text-only batch when only visual-token adapters train
                    logits = logits + sum(p.sum() for p in params) * 0.0  # same values, zero gradients
                losses = span_losses(logits, labels.to(logits.device), mask.to(logits.device), totals=(n_p, n_r))
                if dynamic is not None:
                    dynamic.backward(losses)
                else:
                    engine.backward(combine(losses, lam) * engine.loss_scale)
            sums += torch.stack([losses.perception.detach(), losses.reasoning.detach(), batch["attention_mask"].sum().float()])
        if dynamic is not None:  # reduces the gradients that no framework summed over ranks
            lam = dynamic.apply(reduce=engine.all_reduce if world > 1 else None).lam
        else:
            engine.finish_grads()
        engine.unscale(optimizer)
        clip = params if config.max_grad_norm > 0 else ()
        drift_stats = drift.apply(norms_of=clip) if drift is not None else None
        grad_norm = None
        if config.max_grad_norm > 0:
            grad_norm = clip_grad_norm(params, config.max_grad_norm, drift_stats.total_norm if drift_stats else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        l_p, l_r, tokens = (float(x) for x in engine.all_reduce(sums))
        eff = 0.0 if n_p == 0 else 1.0 if n_r == 0 else lam
        elapsed = time.perf_counter() - started
        metrics = {
            "step": step + 1,
            "total_steps": total,
            "loss": eff * l_p + (1 - eff) * l_r,
            "loss_perception": l_p,
            "loss_reasoning": l_r,
            "lambda": eff,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": int(tokens),
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "perception_tokens": n_p,
            "reasoning_tokens": n_r,
        }
        if hollow:
            metrics["skipped_samples"] = hollow  # too long for --max-length (or bad, with --skip-bad-lines): trained nothing
        seen["supervised_tokens"] += n_p + n_r
        seen["perception_tokens"] += n_p
        seen["hollow"] += hollow
        if drift_stats is not None:
            metrics["drift_tensors"] = drift_stats.biased
            metrics["drift_coefficient"] = drift_stats.mean_coefficient
        if log is not None:
            log.write(metrics)
        if tracker is not None:
            tracker.log(numbers(metrics), step=step + 1)
        if on_step is not None and engine.is_main:
            on_step(metrics)
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < total:
            save_checkpoint(ckpt_root / f"checkpoint-{step + 1}", replace(progress, step=step + 1), run.trainable, optimizer, scheduler, engine)
            engine.barrier()

    stats = {**run.stats, "steps": total, "world_size": world, "threads": torch.get_num_threads(), "global_batch": order.global_batch,
             "final": metrics, "seen": seen}  # fmt: skip
    stats["precision"] = {"mixed": precision.mixed, "trained": precision.master, "frozen": precision.frozen}
    stats["sharded"] = engine.sharded
    if drift is not None:
        stats["drift"] = {
            "tensors": len(drift.params), "zero_delta": len(drift.zero), "parameters": drift.numel, "delta_bytes_per_process": drift.local_bytes,
        }  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()  # the moments (and Δ, below) are not needed for the output: free them first
    del drift, dynamic
    final = setup.output_model(run, model, config, precision, engine)
    if tracker is not None:
        tracker.finish()
    if log is not None:
        log.close()
        setup.save_output(run, final, config, stats, ckpt_root / "metrics.jsonl")
        remove_root(ckpt_root)  # nothing to resume from: the metrics are in the output now
    engine.barrier()
    return TrainResult(config.output, total, metrics, stats, engine.is_main)  # type: ignore[arg-type]


class _MetricsLog:
    """``metrics.jsonl`` beside the checkpoints: one line per step, written as the step ends. A
    resumed run first drops the lines of steps after the checkpoint it continues from."""

    def __init__(self, path: Path, start: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if start and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= start]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self._file = open(path, "a")

    def write(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
