"""The span losses from hidden states, without ever holding the ``[tokens × vocabulary]`` logits.

    losses = head_span_losses(hidden, head, labels, perception_mask, totals=(n_p, n_r))
    combine(losses, lam).backward()          # the same SpanLosses as span_losses(model logits, …)

``hidden`` [B, T, H] are the states the model's LM head reads. Only the positions that predict a
supervised token are used (each span's rows gathered apart), and the head and the cross-entropy
run over ``chunk`` rows at a time: the forward keeps no logits, the backward recomputes each
chunk's logits, turns them into ``softmax − onehot`` scaled by the span's gradient, and adds that
chunk's share to the hidden states' and (when it trains) the head's gradients. Peak memory is one
chunk's logits and softmax, not the sequence's; the head's matrix products run twice (as in
Liger's fused linear cross-entropy and Megatron's CE fusion). A span's rows go through their own
function, so dynamic λ's two backward passes each touch only their span.

Logits are ``hidden @ W.T (+ b)`` in the matrix-product dtype (autocast's, else the weight's),
then fp32, then ``cap·tanh(logits/cap)`` when the model soft-caps them (Gemma 2/3): exactly what
``token_losses`` computes from the model's own logits. ``CHUNK_BYTES`` sizes the chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from surgeon.perception.reweight import IGNORE_INDEX, SpanLosses, span_masks

CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk (its softmax takes as much again)


@dataclass(frozen=True)
class Head:
    """An LM head as the loss needs it: the weight [V, H], an optional bias [V], the soft cap."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """fp32 logits of ``hidden`` [N, H] (the reference the chunks reproduce)."""
        dtype = dtype or self.weight.dtype
        out = F.linear(hidden.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: the fp32 logits of a chunk within ``budget`` bytes (at least 16 rows)."""
    return max(16, budget // max(4 * vocab, 1))


def head_span_losses(
    hidden: torch.Tensor, head: Head, labels: torch.Tensor, perception_mask: torch.Tensor, totals: tuple[int, int] | None = None,
    chunk: int | None = None,
) -> SpanLosses:  # fmt: skip
    """``span_losses`` (``surgeon.perception.reweight``) from hidden states [B, T, H] and the head
    instead of logits: the same values, gradients within rounding, no full logits."""
    perception, reasoning = span_masks(labels, perception_mask)
    n_p, n_r = int(perception.sum()), int(reasoning.sum())
    d_p, d_r = totals if totals is not None else (n_p, n_r)
    targets = labels.roll(-1, dims=1)  # position t predicts t+1 (masks are at the predicted token)
    rows = chunk or chunk_rows(head.weight.shape[0])
    sums = []
    for mask in (perception, reasoning):
        where = mask.roll(-1, dims=1)  # the positions whose next token is in the span
        selected = hidden[where.to(hidden.device)]
        sums.append(ce_sum(selected, head, targets[where].to(hidden.device), rows))
    return SpanLosses(
        perception=sums[0] / max(d_p, 1), reasoning=sums[1] / max(d_r, 1),
        n_perception=n_p, n_reasoning=n_r, norm_perception=d_p, norm_reasoning=d_r,
    )  # fmt: skip


def ce_sum(hidden: torch.Tensor, head: Head, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Σ cross-entropy of ``head(hidden)`` [N, V] against ``targets`` [N], chunk by chunk (a
    scalar with gradients to ``hidden`` and, when it requires them, the head)."""
    dtype = _matmul_dtype(hidden)
    # (an empty span goes through the function too: every process builds the same graph, so that
    # the collectives its backward may run match)
    bias = head.bias if head.bias is not None else hidden.new_zeros(0)
    return _ChunkedCE.apply(hidden, head.weight, bias, targets, head.softcap or 0.0, chunk, dtype)


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype | None:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class _ChunkedCE(torch.autograd.Function):
    """Σ CE(head(h), y) over rows in chunks; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, softcap, chunk, dtype):  # type: ignore[override]
        head = Head(weight, bias if bias.numel() else None, softcap or None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk):
                logits = head.logits(hidden[start : start + chunk], dtype)
                total += F.cross_entropy(logits, targets[start : start + chunk], ignore_index=IGNORE_INDEX, reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.softcap, ctx.chunk, ctx.dtype = softcap, chunk, dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        dtype = ctx.dtype or weight.dtype
        want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias.numel() > 0
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                h, y = hidden[start : start + ctx.chunk], targets[start : start + ctx.chunk]
                raw = F.linear(h.to(dtype), weight.to(dtype), None if bias.numel() == 0 else bias.to(dtype)).float()
                logits = torch.tanh(raw / ctx.softcap) * ctx.softcap if ctx.softcap else raw
                d = torch.softmax(logits, dim=-1)
                keep = y != IGNORE_INDEX
                d[torch.arange(len(y), device=y.device)[keep], y[keep]] -= 1.0
                d[~keep] = 0.0
                d *= grad
                if ctx.softcap:  # through cap·tanh(z/cap): × (1 − tanh²)
                    d *= 1.0 - (logits / ctx.softcap) ** 2
                if want_h:
                    grad_h[start : start + ctx.chunk] = (d.to(dtype) @ weight.to(dtype)).to(hidden.dtype)
                if want_w:
                    grad_w += d.t() @ h.float()
                if want_b:
                    grad_b += d.sum(0)
        return (
            grad_h, grad_w.to(weight.dtype) if want_w else None, grad_b.to(bias.dtype) if want_b else None, None, None, None, None,
        )
