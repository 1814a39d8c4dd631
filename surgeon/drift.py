"""DRIFT: bend every fine-tuning gradient toward a fixed reasoning prior Δ (arXiv 2510.15050).

Per biased tensor, once per optimiser step, with α the strength (METHODS.md §1)::

    absolute:         g' = g − α·Δ
    gradnorm:         g' = g − α·‖g‖·Δ/‖Δ‖
    adaptive_cosine:  c = clamp(⟨g,Δ⟩/(‖g‖·‖Δ‖), −1, 1);  α' = α·(c+1)/2;  g' = g − α'·‖g‖·Δ/‖Δ‖

The optimiser then moves θ ← θ − η·opt(g'), so subtracting Δ pulls θ toward the reasoning model.

The rule is not linear in g (‖g‖ and c depend on it), so *where* it is applied matters. surgeon
applies it once per optimiser step to the accumulated and all-reduced gradient — after the last
micro-batch's backward, before clipping — so the update does not depend on world size or on how
the batch was split into micro-batches. Δ is moved once onto each parameter's device and dtype
policy (fp32 maths, gradient dtype kept); no host copies happen during training.

Outside surgeon's trainer::

    drift = Drift.from_prior(model, "prior/", alpha=1.0, scale="adaptive_cosine")
    handle = drift.attach(optimizer, max_grad_norm=1.0)   # DRIFT, then clipping, before each step

With the Hugging Face Trainer / TRL, whose loop clips *before* the optimiser step, set
``max_grad_norm=0`` in the trainer's arguments and let ``attach(..., max_grad_norm=…)`` clip after
DRIFT; otherwise DRIFT acts on the already-clipped gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from surgeon.errors import ConfigError

Scale = Literal["adaptive_cosine", "gradnorm", "absolute"]
SCALES: tuple[str, ...] = ("adaptive_cosine", "gradnorm", "absolute")
EPS = 1e-12


def _local(x: torch.Tensor) -> torch.Tensor:
    """A reduced DTensor (sharded parameters) as a plain replicated tensor; plain tensors as is."""
    full = getattr(x, "full_tensor", None)
    return full() if callable(full) else x


def drift_coefficient(
    g: torch.Tensor, delta: torch.Tensor, delta_norm: torch.Tensor, alpha: float, scale: str
) -> torch.Tensor:
    """The scalar k (0-dim fp32 tensor, on g's device) such that g' = g − k·Δ.

    Computed without a host sync, so it can run inside a step on any device.
    """
    return _terms(g, delta, delta_norm, alpha, scale)[0]


def _terms(
    g: torch.Tensor, delta: torch.Tensor, delta_norm: torch.Tensor, alpha: float, scale: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(k, ‖g'‖²)``. The new norm follows from what k needed anyway,
    ‖g − kΔ‖² = ‖g‖² − 2k⟨g,Δ⟩ + k²‖Δ‖², so clipping needs no further pass over g'. The
    ``absolute`` scale reads neither ‖g‖ nor ⟨g,Δ⟩, so it returns None for the norm."""
    if scale == "absolute":
        return torch.tensor(alpha, dtype=torch.float32, device=g.device), None
    if scale not in SCALES:
        raise ConfigError("drift_scale", f"unknown scale {scale!r}", f"choose one of {', '.join(SCALES)}")
    g_norm = _local(torch.linalg.vector_norm(g, dtype=torch.float32))
    dot = _dot(g, delta)
    k = alpha * g_norm / delta_norm.clamp_min(EPS)
    if scale == "adaptive_cosine":
        c = (dot / (g_norm * delta_norm).clamp_min(EPS)).clamp(-1.0, 1.0)
        k = k * (c + 1) / 2
    return k, (g_norm * g_norm - 2 * k * dot + k * k * delta_norm * delta_norm).clamp_min(0.0)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ in fp32 without a full-size temporary for plain fp32 tensors."""
    if getattr(a, "device_mesh", None) is None and a.dtype == b.dtype == torch.float32:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return _local((a.float() * b.float()).sum())


def drift_gradient(g: torch.Tensor, delta: torch.Tensor, alpha: float, scale: str) -> torch.Tensor:
    """g' for one tensor, out of place (the formula as a function; ``Drift.apply`` works in place)."""
    delta_norm = torch.linalg.vector_norm(delta.float())
    k = drift_coefficient(g, delta, delta_norm, alpha, scale)
    return (g.float() - k * delta.float()).to(g.dtype)


@dataclass(frozen=True)
class DriftStats:
    """What one ``apply`` did: tensors biased, tensors without a gradient, mean coefficient, and
    the new gradient norms it already knows (``{id(param): ‖g'‖}``) for ``clip_grad_norm``."""

    biased: int
    skipped: int
    mean_coefficient: float
    grad_norms: dict[int, torch.Tensor] = field(default_factory=dict)


class Drift:
    """Δ for each biased parameter, held on the parameter's device, applied to ``.grad`` in place.

    ``targets`` are ``(name, parameter, delta)`` triples with ``delta.shape == parameter.shape``.
    ``alpha == 0`` leaves every gradient bit-for-bit unchanged.
    """

    def __init__(
        self, targets: Iterable[tuple[str, torch.nn.Parameter, torch.Tensor]], alpha: float = 1.0, scale: str = "adaptive_cosine"
    ) -> None:
        if scale not in SCALES:
            raise ConfigError("drift_scale", f"unknown scale {scale!r}", f"choose one of {', '.join(SCALES)}")
        if not (math.isfinite(float(alpha)) and float(alpha) >= 0):
            raise ConfigError("drift_alpha", f"must be a finite number ≥ 0, got {alpha}")
        self.alpha = float(alpha)
        self.scale = scale
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.deltas: list[torch.Tensor] = []
        self.delta_norms: list[torch.Tensor] = []
        for name, param, delta in targets:
            if tuple(delta.shape) != tuple(param.shape):
                raise ConfigError("prior", f"Δ for {name} has shape {tuple(delta.shape)}, the parameter {tuple(param.shape)}")
            delta = _like_param(delta, param)
            self.names.append(name)
            self.params.append(param)
            self.deltas.append(delta)
            self.delta_norms.append(_local(torch.linalg.vector_norm(delta.float())))
        if not self.params:
            raise ConfigError("prior", "no parameter of the model is biased by the prior", "check the prior's tensor selection")

    @classmethod
    def from_prior(
        cls,
        parameters: torch.nn.Module | dict[str, torch.nn.Parameter],
        prior: str | Path,
        alpha: float = 1.0,
        scale: str = "adaptive_cosine",
        normalize: bool = True,
    ) -> Drift:
        """Attach a ``surgeon prior`` folder (or Hub repo id) to a model's language-model parameters.

        ``parameters``: the model itself (a transformers VLM or LLM, peft-free: DRIFT biases full
        weights), or a dict that maps LM-relative names (``layers.3.mlp.up_proj.weight``, ``lm_head.weight``;
        see ``surgeon.training.model.lm_parameters``) to parameters; the prior's tensors are
        matched through the same names, whatever the on-disk layout of the VLM it was made from.
        ``normalize``: Δ ← Δ·‖θ_VLM‖/max(‖Δ‖, eps) (the reference default; it changes only the
        ``absolute`` scale). Every prior tensor must find its parameter, with the same shape.
        """
        from surgeon.prior import open_prior

        if isinstance(parameters, torch.nn.Module):
            from surgeon.training.model import lm_parameters

            parameters = dict(lm_parameters(parameters))
        targets = []
        with open_prior(prior) as p:
            missing = [p.relative(n) for n in p.names if p.relative(n) not in parameters]
            if missing:
                raise ConfigError(
                    "prior",
                    f"{len(missing)} of the prior's {len(p.names)} tensors have no parameter in the model, e.g. {missing[0]}",
                    "use a prior computed for this model's language model",
                )
            for name in p.names:
                rel = p.relative(name)
                delta = p.read(name)
                if normalize:
                    delta = delta * (p.vlm_norm(name) / max(float(torch.linalg.vector_norm(delta)), EPS))
                targets.append((rel, parameters[rel], delta))
        return cls(targets, alpha=alpha, scale=scale)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def apply(self) -> DriftStats:
        """Bend every biased parameter's current ``.grad`` (call once per optimiser step)."""
        if self.alpha == 0.0:
            return DriftStats(0, 0, 0.0)
        biased, skipped, norms = 0, 0, {}
        total = torch.zeros((), dtype=torch.float32, device=_device(self.params[0]))
        for p, delta, delta_norm in zip(self.params, self.deltas, self.delta_norms):
            if p.grad is None:
                skipped += 1
                continue
            k, new_sq = _terms(p.grad, delta, delta_norm, self.alpha, self.scale)
            if p.grad.dtype == torch.float32 == delta.dtype:
                p.grad.addcmul_(delta, k, value=-1.0)  # g − k·Δ, no full-size temporary
            else:
                p.grad.copy_((p.grad.float() - delta.float() * k).to(p.grad.dtype))
            if new_sq is not None and p.grad.dtype == torch.float32:
                norms[id(p)] = new_sq.sqrt()
            total += k.to(total.device)
            biased += 1
        return DriftStats(biased, skipped, float(total) / max(biased, 1), norms)  # one host sync per step

    def attach(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> Any:
        """Apply DRIFT (then clip to ``max_grad_norm`` if given) before every ``optimizer.step()``.

        For loops you do not control. Returns the hook handle (``.remove()`` detaches).
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            stats = self.apply()
            if max_grad_norm:
                clip_grad_norm(params, max_grad_norm, stats.grad_norms)

        return optimizer.register_step_pre_hook(hook)


def _like_param(delta: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """Δ in the parameter's dtype on its device (sharded like it for DTensor parameters), so it
    costs at most one more copy of the biased weights and is never copied again."""
    delta = delta.to(device=_device(param), dtype=param.dtype)
    mesh = getattr(param, "device_mesh", None)
    if mesh is not None:
        from torch.distributed.tensor import distribute_tensor

        delta = distribute_tensor(delta, mesh, param.placements)
    return delta


def _device(param: torch.Tensor) -> torch.device:
    mesh = getattr(param, "device_mesh", None)
    return torch.device(mesh.device_type) if mesh is not None else param.device


def clip_grad_norm(
    params: Iterable[torch.nn.Parameter], max_norm: float, known: dict[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (same coefficient, max_norm/(total+1e-6) capped at 1)
    that takes per-tensor norms already known (``DriftStats.grad_norms``) instead of reading
    those gradients once more. Returns the total norm before clipping."""
    known = known or {}
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    rest = [p.grad for p in params if p.grad is not None and id(p) not in known]
    device = grads[0].device
    squares = [n.to(device) ** 2 for n in known.values()]
    squares += [_local(n).float().to(device) ** 2 for n in torch._foreach_norm(rest)] if rest else []
    total = torch.stack(squares).sum().sqrt()
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total
