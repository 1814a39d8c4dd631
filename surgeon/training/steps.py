"""The steps of one optimiser step of ``surgeon train``, in the order the loop takes them:

    counts = fetch(s)                      # the step's micro-batches; span token counts of the global batch
    sums, lam = accumulate(s, counts)      # per micro-batch: forward, span losses, backward
    lam, drift, norm = update(s, lam)      # gradients reduced; DRIFT; clipping; AdamW; the schedule
    metrics = step_metrics(s, step, counts, sums, lam, drift, norm, seconds)

Every loss is normalised by the span token counts of the whole global batch (batch size ×
accumulation × processes), and DRIFT and clipping see the final, reduced gradient, so how the
global batch is split does not change the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from surgeon.training.session import Session


@dataclass(frozen=True)
class Counts:
    """One step's micro-batches and the token counts of the global batch (summed over processes):
    perception and reasoning tokens that carry a loss, and hollow (skipped) samples."""

    batches: list[dict[str, torch.Tensor]]
    perception: int
    reasoning: int
    hollow: int
    samples: int = 0
    reasons: tuple[str, ...] = ()  # this process's reasons for its hollow samples


def fetch(s: Session) -> Counts:
    """The next ``grad_accum`` micro-batches of this process and the global token counts (one
    all-reduce, before any forward)."""
    from surgeon.perception.reweight import count_span_tokens

    fetched = [next(s.loader) for _ in range(s.config.grad_accum)]
    local = torch.tensor([[*count_span_tokens(b["labels"], b["perception_mask"]), len(h), _samples(b)] for b, h in fetched]).sum(0)
    n_p, n_r, hollow, samples = (int(x) for x in s.engine.all_reduce(local.to(s.engine.device)))
    return Counts([batch for batch, _ in fetched], n_p, n_r, hollow, samples, tuple(r for _, h in fetched for r in h))


def _samples(batch: dict[str, torch.Tensor]) -> int:
    lengths = batch.get("packed_lengths")
    return int(lengths.numel()) if lengths is not None else int(batch["input_ids"].shape[0])


def accumulate(s: Session, counts: Counts) -> tuple[torch.Tensor, float]:
    """Forward, span losses and backward for each micro-batch; returns this process's (L_p, L_r,
    tokens) sums and λ: fixed, the perception token share (plain cross-entropy), or, for dynamic
    λ, a placeholder that ``update`` replaces. DDP syncs gradients on the last micro-batch only."""
    from surgeon.perception.reweight import combine

    config, engine = s.config, s.engine
    n_p, n_r = counts.perception, counts.reasoning
    lam = config.fixed_lambda if config.fixed_lambda is not None else n_p / max(n_p + n_r, 1)
    sums = torch.zeros(4, device=engine.device)  # L_p, L_r, real tokens, padding positions (this rank)
    for j, batch in enumerate(counts.batches):
        last = j == len(counts.batches) - 1 and s.dynamic is None
        labels, mask = batch.pop("labels"), batch.pop("perception_mask")
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        real = batch["attention_mask"].sum().float()
        with engine.sync(s.model, last), s.forward.micro_batch(batch) as inputs:
            losses = s.forward.losses(inputs, labels, mask, (n_p, n_r), s.params)
            if s.dynamic is not None:
                s.dynamic.backward(losses)
            else:
                engine.backward(combine(losses, lam) * engine.loss_scale)
        sums += torch.stack([losses.perception.detach().float(), losses.reasoning.detach().float(), real, batch["attention_mask"].numel() - real])
    return sums, lam


def update(s: Session, lam: float) -> tuple[float, Any, torch.Tensor | None]:
    """The gradients finished (dynamic λ: its two buffers combined, reduced where no framework did),
    then DRIFT on the accumulated gradient, clipping, the AdamW step and the schedule. Returns
    (λ, DRIFT's statistics or None, the gradient norm before clipping or None)."""
    from surgeon.drift.bias import clip_grad_norm

    config, engine = s.config, s.engine
    if s.dynamic is not None:  # reduces the gradients that no framework summed over ranks
        lam = s.dynamic.apply(reduce=engine.all_reduce if engine.world > 1 else None).lam
    else:
        engine.finish_grads()
    engine.release()  # a unit kept gathered through the step's backward passes: sharded again before the update
    engine.unscale(s.optimizer)
    clip = s.params if config.max_grad_norm > 0 else ()
    drift_stats = s.drift.apply(norms_of=clip) if s.drift is not None else None
    grad_norm = None
    if config.max_grad_norm > 0:
        grad_norm = clip_grad_norm(s.params, config.max_grad_norm, drift_stats.total_norm if drift_stats else None)
    s.lr = s.scheduler.get_last_lr()[0]  # the rate this step uses (the schedule moves on below)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return lam, drift_stats, grad_norm


def step_metrics(
    s: Session, step: int, counts: Counts, sums: torch.Tensor, lam: float, drift_stats: Any, grad_norm: Any, seconds: float
) -> dict[str, Any]:
    """The step's metrics, the same on every process: losses and tokens summed over processes, λ
    with the empty-span rule (``surgeon.perception.reweight.effective_lambda``)."""
    from surgeon.perception.reweight import effective_lambda

    l_p, l_r, tokens, padding = (float(x) for x in s.engine.all_reduce(sums))
    eff = effective_lambda(lam, counts.perception, counts.reasoning)
    metrics = {
        "step": step + 1,
        "total_steps": s.total,
        "loss": eff * l_p + (1 - eff) * l_r,
        "loss_perception": l_p,
        "loss_reasoning": l_r,
        "lambda": eff,
        "lr": s.lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens": int(tokens),
        "padding": int(padding),
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "perception_tokens": counts.perception,
        "reasoning_tokens": counts.reasoning,
    }
    metrics["samples"] = counts.samples
    if counts.hollow:
        metrics["skipped_samples"] = counts.hollow  # too long for --max-length (or bad, with --skip-bad-lines): trained nothing
        metrics["skipped_because"] = sorted(set(counts.reasons))[:3]
    if drift_stats is not None:
        metrics["drift_tensors"] = drift_stats.biased
        metrics["drift_coefficient"] = drift_stats.mean_coefficient
    return metrics
