"""Perception/reasoning reweighting of the SFT loss (docs/methods.md §5, arXiv 2605.29496).

The supervised tokens of a batch split into a perception span (``perception_mask``) and a
reasoning span (every other supervised token, the answer and end-of-turn tokens included):

    L = λ·L_p + (1−λ)·L_r        L_p, L_r = token-averaged cross-entropy over each span

Fixed λ (a plain backward):

    losses = span_losses(logits, batch["labels"], batch["perception_mask"])
    combine(losses, lam=0.5).backward()

With λ = N_p/(N_p+N_r) this is exactly the plain token-averaged cross-entropy.

Dynamic λ (NGDiff-style, the paper's): λ_t = ‖g_r‖ / (‖g_p‖ + ‖g_r‖), with g_p = ∇L_p and
g_r = ∇L_r over the trainable parameters and no gradient through λ. The update is then
proportional to g_p/‖g_p‖ + g_r/‖g_r‖. Both norms are computed exactly, with two backward passes
(L_p keeping the graph, then L_r):

    grads = PerceptionGradients(trainable_params)     # once per optimiser step
    for micro_batch in step:                          # gradient accumulation
        grads.backward(span_losses(model(**inputs).logits, labels, mask, totals=step_counts))
    result = grads.apply()                            # .grad = λ·g_p + (1−λ)·g_r; result.lam

``dynamic_backward(params, losses)`` is the one-micro-batch shorthand. The accumulator keeps g_p
and g_r separately for the whole step (memory: 2× the trainable parameters' gradients, instead of
1× for a plain step), because λ must come from the norms of the full-step gradients, not from
each micro-batch's. For the sum of micro-batch losses to be the step's token average, pass the
step's token counts (``count_span_tokens`` summed over micro-batches and ranks) as ``totals``.
Under data parallelism run the backwards without the framework's gradient sync and pass a
``reduce`` that sums each buffer over ranks, so the norms are those of the global gradients.
Under FSDP the backwards reduce-scatter as usual, the buffers hold each rank's rows of the summed
gradients, and the norms add the ranks' partial sums (``surgeon.dtensor``); ``reduce`` then
applies only to parameters that are not sharded.

Empty spans (not specified by the paper; surgeon default): a span with no tokens has L = 0 (still
attached to the graph) and gets no weight. λ becomes 0 when the step has no perception tokens and
1 when it has no reasoning tokens, for fixed and dynamic λ alike, so such a step trains on the
other span at full weight instead of taking a zero or down-scaled step. If both gradient norms
are zero, λ = 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from surgeon.dtensor import global_norm, is_sharded

IGNORE_INDEX = -100
EPS = 1e-12


@dataclass(frozen=True)
class SpanLosses:
    """Token-averaged cross-entropy of each span (scalars with grad).

    ``n_*``: the span's supervised tokens in this batch. ``norm_*``: the divisor used (``n_*``,
    or the step's total when ``totals`` was given); a span with divisor 0 is empty.
    """

    perception: torch.Tensor
    reasoning: torch.Tensor
    n_perception: int
    n_reasoning: int
    norm_perception: int
    norm_reasoning: int


@dataclass(frozen=True)
class DynamicLambda:
    """The λ of one optimiser step and the global L2 norms of the two span gradients."""

    lam: float
    norm_perception: float
    norm_reasoning: float


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, T], aligned with ``labels``: entry t is the loss of predicting
    ``labels[:, t]`` from ``logits[:, t-1]`` (causal shift), 0 at t = 0 and where labels are -100.
    Computed in float32."""
    b, t, v = logits.shape
    target = labels[:, 1:]
    flat = logits[:, :-1].float().reshape(-1, v)
    ce = F.cross_entropy(flat, target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return torch.cat([ce.new_zeros(b, 1), ce.view(b, t - 1)], dim=1)


def span_masks(labels: torch.Tensor, perception_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, T] masks of perception and reasoning tokens among the predicted (shifted) labels."""
    supervised = labels != IGNORE_INDEX
    supervised[:, 0] = False  # nothing predicts the first token
    perception = perception_mask.bool() & supervised
    return perception, supervised & ~perception


def count_span_tokens(labels: torch.Tensor, perception_mask: torch.Tensor) -> tuple[int, int]:
    """``(N_p, N_r)``: perception and reasoning tokens that carry a loss in this batch."""
    perception, reasoning = span_masks(labels, perception_mask)
    return int(perception.sum()), int(reasoning.sum())


def span_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    perception_mask: torch.Tensor,
    totals: tuple[int, int] | None = None,
) -> SpanLosses:
    """L_p and L_r from logits [B, T, V], labels [B, T] (-100 = unsupervised), perception_mask [B, T].

    ``totals``: divide by these ``(N_p, N_r)`` instead of this batch's counts (the whole step's,
    for gradient accumulation and data parallelism).
    """
    ce = token_losses(logits, labels)
    perception, reasoning = span_masks(labels, perception_mask)
    n_p, n_r = int(perception.sum()), int(reasoning.sum())
    d_p, d_r = totals if totals is not None else (n_p, n_r)
    return SpanLosses(
        perception=(ce * perception).sum() / max(d_p, 1),
        reasoning=(ce * reasoning).sum() / max(d_r, 1),
        n_perception=n_p,
        n_reasoning=n_r,
        norm_perception=d_p,
        norm_reasoning=d_r,
    )


def effective_lambda(lam: float, norm_perception: int, norm_reasoning: int) -> float:
    """λ with the empty-span rule: 0 without perception tokens, 1 without reasoning tokens."""
    if norm_perception == 0:
        return 0.0
    if norm_reasoning == 0:
        return 1.0
    return lam


def combine(losses: SpanLosses, lam: float) -> torch.Tensor:
    """``λ·L_p + (1−λ)·L_r`` for a fixed λ in [0, 1] (the empty-span rule applied)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"perception weight λ must lie in [0, 1], got {lam}")
    lam = effective_lambda(lam, losses.norm_perception, losses.norm_reasoning)
    return lam * losses.perception + (1.0 - lam) * losses.reasoning


def dynamic_lambda(norm_perception: float, norm_reasoning: float) -> float:
    """NGDiff's ``λ = ‖g_r‖ / (‖g_p‖ + ‖g_r‖)``; 0.5 when both norms are zero."""
    total = norm_perception + norm_reasoning
    return 0.5 if total < EPS else norm_reasoning / total


class PerceptionGradients:
    """Accumulates g_p and g_r separately over the micro-batches of one optimiser step.

    ``backward(losses)`` per micro-batch (two backward passes: L_p with the graph kept, then
    L_r; an empty span's pass is skipped); ``apply()`` once per step writes
    ``λ·g_p + (1−λ)·g_r`` into each parameter's ``.grad`` and resets the accumulator.
    The parameters' ``.grad`` must be None when a step starts
    (``optimizer.zero_grad(set_to_none=True)``); between ``backward`` calls they stay None, the
    gradients living in the two buffers (2× the trainable gradients' memory).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("PerceptionGradients needs at least one trainable parameter")
        self._reset()

    def _reset(self) -> None:
        self.g_p: list[torch.Tensor | None] = [None] * len(self.params)
        self.g_r: list[torch.Tensor | None] = [None] * len(self.params)
        self.norm_perception = 0
        self.norm_reasoning = 0

    def backward(self, losses: SpanLosses) -> None:
        """Add this micro-batch's ∇L_p and ∇L_r to the two buffers (a pass for each span that is
        not empty in the whole step)."""
        if any(p.grad is not None for p in self.params):
            raise RuntimeError("parameters hold gradients; call optimizer.zero_grad(set_to_none=True) first")
        self.norm_perception = max(self.norm_perception, losses.norm_perception)
        self.norm_reasoning = max(self.norm_reasoning, losses.norm_reasoning)
        # A span empty in this micro-batch but not in the step (``totals``) still gets its pass, a
        # zero gradient: under FSDP every rank must run the same backward passes.
        passes = [(losses.perception, self.g_p)] if losses.norm_perception else []
        passes += [(losses.reasoning, self.g_r)] if losses.norm_reasoning else []
        for k, (loss, buffers) in enumerate(passes):
            for p, buf in zip(self.params, buffers):
                p.grad = buf  # autograd accumulates into the buffer
            try:
                loss.backward(retain_graph=k + 1 < len(passes))
            finally:
                for i, p in enumerate(self.params):
                    buffers[i], p.grad = p.grad, None

    def apply(self, reduce: Callable[[torch.Tensor], None] | None = None) -> DynamicLambda:
        """Set ``.grad = λ·g_p + (1−λ)·g_r`` with λ from the global norms; return λ and the norms.

        ``reduce``: an in-place cross-rank sum applied first to the buffer of every parameter
        that is not sharded (data parallelism; every rank reduces every such buffer, zeros where
        it had no gradient, so the collectives match; pass step-wide ``totals`` to
        ``span_losses`` so that empty spans are judged globally). Sharded buffers already hold
        summed gradients; their norms are summed over ranks from local parts.
        """
        if reduce is not None:
            for buffers in (self.g_p, self.g_r):
                for i, p in enumerate(self.params):
                    if is_sharded(p):
                        continue
                    if buffers[i] is None:
                        buffers[i] = torch.zeros_like(p)
                    reduce(buffers[i])
        norm_p, norm_r = global_norm(self.g_p), global_norm(self.g_r)
        if self.norm_perception == 0 or self.norm_reasoning == 0:
            lam = effective_lambda(0.5, self.norm_perception, self.norm_reasoning)
        else:
            lam = dynamic_lambda(norm_p, norm_r)
        for p, a, b in zip(self.params, self.g_p, self.g_r):
            if a is not None and b is not None:
                p.grad = a.mul_(lam).add_(b, alpha=1.0 - lam)
            elif a is not None:
                p.grad = a.mul_(lam)
            elif b is not None:
                p.grad = b.mul_(1.0 - lam)
        self._reset()
        return DynamicLambda(lam, norm_p, norm_r)


def dynamic_backward(
    params: Iterable[torch.nn.Parameter],
    losses: SpanLosses,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> DynamicLambda:
    """One micro-batch, one step: two backwards, then ``.grad = λ_t·g_p + (1−λ_t)·g_r``."""
    grads = PerceptionGradients(params)
    grads.backward(losses)
    return grads.apply(reduce)
