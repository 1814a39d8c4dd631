"""DRIFT: bend every fine-tuning gradient toward a fixed reasoning prior Δ (arXiv 2510.15050).

Per biased tensor, once per optimiser step, with α the strength (docs/methods.md §1)::

    absolute:         g' = g − α·Δ
    gradnorm:         g' = g − α·‖g‖·Δ/‖Δ‖
    adaptive_cosine:  c = clamp(⟨g,Δ⟩/(‖g‖·‖Δ‖), −1, 1);  α' = α·(c+1)/2;  g' = g − α'·‖g‖·Δ/‖Δ‖

The optimiser then moves θ ← θ − η·opt(g'), so subtracting Δ pulls θ toward the reasoning model.

The rule is not linear in g (‖g‖ and c depend on it), so *where* it is applied matters. surgeon
applies it once per optimiser step to the accumulated and all-reduced gradient — after the last
micro-batch's backward, before clipping — so the update does not depend on world size or on how
the batch was split into micro-batches. Δ is moved once onto each parameter's device, in the
prior's stored dtype (fp32 maths, gradient dtype kept); no host copies happen during training.

Sharded parameters (FSDP2 DTensors, ``surgeon.dtensor``): Δ is sharded exactly like its
parameter (each rank keeps only its own rows, read from the prior's file), ‖g‖, ⟨g,Δ⟩ and the
norms that clipping needs are summed over ranks from local partial sums in one all-reduce per
step for all tensors together, and the update is applied to the local rows. The gradient is
never gathered.

Outside surgeon's trainer::

    drift = Drift.from_prior(model, "prior/", alpha=1.0, scale="adaptive_cosine")
    handle = drift.attach(optimizer, max_grad_norm=1.0)   # DRIFT, then clipping, before each step

With the Hugging Face Trainer / TRL, whose loop clips *before* the optimiser step, set
``max_grad_norm=0`` in the trainer's arguments and let ``attach(..., max_grad_norm=…)`` clip after
DRIFT; otherwise DRIFT acts on the already-clipped gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from surgeon.errors import ConfigError
from surgeon.dtensor import global_sums, is_sharded, local, row_range

Scale = Literal["adaptive_cosine", "gradnorm", "absolute"]
SCALES: tuple[str, ...] = ("adaptive_cosine", "gradnorm", "absolute")
EPS = 1e-12


def drift_coefficient(
    g: torch.Tensor, delta: torch.Tensor, delta_norm: torch.Tensor, alpha: float, scale: str
) -> torch.Tensor:
    """The scalar k (0-dim fp32 tensor, on g's device) such that g' = g − k·Δ, for plain tensors.

    Computed without a host sync, so it can run inside a step on any device.
    """
    _check_scale(scale)
    g_norm = torch.linalg.vector_norm(g, dtype=torch.float32)
    return _coefficients(g_norm, _dot(g, delta), delta_norm, alpha, scale)


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ConfigError("drift_scale", f"unknown scale {scale!r}", f"choose one of {', '.join(SCALES)}")


def _coefficients(
    g_norm: torch.Tensor, dot: torch.Tensor, delta_norm: torch.Tensor, alpha: float, scale: str
) -> torch.Tensor:
    """k for each tensor (elementwise over vectors of whole-tensor ‖g‖, ⟨g,Δ⟩ and ‖Δ‖)."""
    if scale == "absolute":
        return torch.full_like(g_norm, alpha)
    k = alpha * g_norm / delta_norm.clamp_min(EPS)
    if scale == "adaptive_cosine":
        c = (dot / (g_norm * delta_norm).clamp_min(EPS)).clamp(-1.0, 1.0)
        k = k * (c + 1) / 2
    return k


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ of plain (local) tensors in fp32; no full-size temporary when both are fp32."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype != torch.float32:
        a = a.float()
    if b.dtype != torch.float32:
        b = b.float()
    return torch.dot(a, b)


def _norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """fp32 norms of plain tensors as one vector on ``device``."""
    if not tensors:
        return torch.zeros(0, device=device)
    if any(t.dtype == torch.float64 for t in tensors):  # fp32 accumulation would narrow them
        return torch.stack([torch.linalg.vector_norm(t).float().to(device) for t in tensors])
    return torch.stack([n.to(device) for n in torch._foreach_norm(list(tensors), 2, dtype=torch.float32)])


def drift_gradient(g: torch.Tensor, delta: torch.Tensor, alpha: float, scale: str, *, norm_to: float | None) -> torch.Tensor:
    """g' for one plain tensor, out of place (the formula as a function; ``Drift.apply`` works in place).

    ``norm_to``: the norm Δ is scaled to first, as training does (docs/methods.md §1: Δ·‖θ_VLM‖/‖Δ‖;
    pass ‖θ_VLM‖ of this tensor, e.g. ``open_prior(p).vlm_norm(name)``, for a Δ read from a prior,
    which stores it raw); None uses Δ as given (already normalised, or ``--no-drift-normalize``).
    Only ``absolute`` depends on it: the other scales divide Δ's norm out."""
    delta = delta.float()
    if norm_to is not None:
        delta = delta * (float(norm_to) / max(float(torch.linalg.vector_norm(delta)), EPS))
    delta_norm = torch.linalg.vector_norm(delta)
    k = drift_coefficient(g, delta, delta_norm, alpha, scale)
    return (g.float() - k * delta).to(g.dtype)


@dataclass(frozen=True)
class DriftStats:
    """What one ``apply`` did: tensors biased, tensors without a gradient, the mean coefficient k,
    and ``total_norm``: the global L2 norm, after the bias, of the gradients of every parameter
    passed as ``norms_of`` (None when none was), for ``clip_grad_norm``."""

    biased: int
    skipped: int
    mean_coefficient: float
    total_norm: torch.Tensor | None = None


class Drift:
    """Δ for each biased parameter, held on the parameter's device, applied to ``.grad`` in place.

    ``targets`` are ``(name, parameter, delta)`` or ``(name, parameter, delta, norm_to)`` tuples.
    ``delta`` has the parameter's shape, or, for a parameter sharded by FSDP2, the shape of this
    rank's rows of it (a whole Δ is cut to those rows here). ``norm_to``: scale Δ to this norm
    (the prior's normalisation Δ·‖θ_VLM‖/‖Δ‖), kept as a factor so that Δ stays as stored.
    ``alpha == 0`` leaves every gradient bit-for-bit unchanged. Targets whose Δ is zero
    everywhere are not biased (``zero`` lists them); ``names``/``params`` are the biased ones.
    """

    def __init__(
        self, targets: Iterable[tuple[Any, ...]], alpha: float = 1.0, scale: str = "adaptive_cosine"
    ) -> None:
        _check_scale(scale)
        if not (math.isfinite(float(alpha)) and float(alpha) >= 0):
            raise ConfigError("drift_alpha", f"must be a finite number ≥ 0, got {alpha}")
        self.alpha = float(alpha)
        self.scale = scale
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.deltas: list[torch.Tensor] = []
        norm_to: list[float | None] = []
        for name, param, delta, *rest in targets:
            self.names.append(name)
            self.params.append(param)
            self.deltas.append(_local_delta(name, delta, param))
            norm_to.append(rest[0] if rest else None)
        if not self.params:
            raise ConfigError("prior", "no parameter of the model is biased by the prior", "check the prior's tensor selection")
        sharded = [is_sharded(p) for p in self.params]
        device = self.deltas[0].device
        raw = global_sums(_norms(self.deltas, device) ** 2, sharded, self.params).sqrt()
        # Δ = 0 (e.g. biases both models keep at zero): nothing to bend toward; counted, not biased
        keep = [i for i, n in enumerate(raw.tolist()) if n > 0]
        self.zero: list[str] = [self.names[i] for i in range(len(self.names)) if i not in set(keep)]
        if not keep:
            raise ConfigError("prior", f"every one of the prior's {len(self.names)} tensors is zero", "compute the prior from two different models")
        self.names, self.params, self.deltas = [self.names[i] for i in keep], [self.params[i] for i in keep], [self.deltas[i] for i in keep]
        norm_to, raw = [norm_to[i] for i in keep], raw[torch.tensor(keep, device=raw.device)]
        self._ids = {id(p): i for i, p in enumerate(self.params)}
        self._sharded = [sharded[i] for i in keep]
        self.device = device
        factors = [1.0 if want is None else float(want) / max(float(n), EPS) for want, n in zip(norm_to, raw.tolist())]
        self.factors = torch.tensor(factors, dtype=torch.float32, device=self.device)
        self.delta_norms = raw * self.factors  # ‖factor·Δ‖ over all ranks

    @classmethod
    def from_prior(
        cls,
        parameters: torch.nn.Module | dict[str, torch.nn.Parameter],
        prior: str | Path,
        alpha: float = 1.0,
        scale: str = "adaptive_cosine",
        normalize: bool = True,
        trained_only: bool = False,
    ) -> Drift:
        """Attach a ``surgeon prior`` folder (or Hub repo id) to a model's language-model parameters.

        ``parameters``: the model itself (a transformers VLM or LLM, peft-free: DRIFT biases full
        weights; sharded by FSDP2 or not), or a dict that maps LM-relative names
        (``layers.3.mlp.up_proj.weight``, ``lm_head.weight``; see
        ``surgeon.anatomy.decoder.lm_parameters``) to parameters; the prior's tensors are matched
        through the same names, whatever the on-disk layout of the VLM it was made from. Each rank
        reads only the rows of Δ that its shard of the parameter holds.
        ``normalize``: Δ ← Δ·‖θ_VLM‖/max(‖Δ‖, eps) (the reference default; it changes only the
        ``absolute`` scale). Every prior tensor must find its parameter, with the same shape, or
        (mixture-of-experts weights) the fused expert parameter it is part of: fused experts stored
        in the released orientation are transposed, and per-expert Δ of a model that fuses its
        experts in memory are stacked like the parameter (normalised as one tensor then).
        ``trained_only`` (a model): Δ of parameters that do not train (outside ``train --modules``)
        is not read.
        """
        from surgeon.drift.prior import open_prior

        frozen: set[str] = set()  # buffers the prior may cover (router biases): nothing to bias there
        if isinstance(parameters, torch.nn.Module):
            from surgeon.anatomy.decoder import lm_parameters

            model = parameters
            parameters = dict(lm_parameters(model))
            frozen = {n for n, _ in lm_parameters(model, buffers=True)} - set(parameters)
            if trained_only:
                frozen |= {n for n, p in parameters.items() if not p.requires_grad}
        with open_prior(prior) as p:
            targets = [(rel, param, delta, norm if normalize else None) for rel, param, delta, norm in prior_deltas(p, parameters, frozen)]
        if not targets:
            raise ConfigError("prior", "none of the tensors that train has Δ in the prior", "select trained tensors the prior covers (--modules/--layers)")
        return cls(targets, alpha=alpha, scale=scale)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def local_bytes(self) -> int:
        """Bytes of Δ held by this process (its rows only, when the parameters are sharded)."""
        return sum(d.numel() * d.element_size() for d in self.deltas)

    @torch.no_grad()
    def apply(self, norms_of: Iterable[torch.nn.Parameter] = ()) -> DriftStats:
        """Bend every biased parameter's current ``.grad`` (call once per optimiser step).

        ``norms_of``: parameters whose global gradient norm after the bias is wanted (for
        clipping); it comes out of the same single all-reduce as ‖g‖ and ⟨g,Δ⟩, and for biased
        tensors from the identity ‖g − kΔ‖² = ‖g‖² − 2k⟨g,Δ⟩ + k²‖Δ‖², without another pass."""
        norms_of = [p for p in norms_of if p.grad is not None]
        active = [i for i, p in enumerate(self.params) if p.grad is not None]
        skipped = len(self.params) - len(active)
        if self.alpha == 0.0:
            total = squared_norm(norms_of).sqrt() if norms_of else None
            return DriftStats(0, skipped, 0.0, total)
        others = [p for p in norms_of if id(p) not in self._ids]
        grads = [local(self.params[i].grad) for i in active]  # type: ignore[arg-type]
        deltas = [self.deltas[i] for i in active]
        index = torch.tensor(active, dtype=torch.long, device=self.device)
        factors, delta_norms = self.factors[index], self.delta_norms[index]
        sharded = [self._sharded[i] for i in active]
        other_sharded = [is_sharded(p.grad) for p in others]  # type: ignore[arg-type]
        other_sq = _norms([local(p.grad) for p in others], self.device) ** 2  # type: ignore[arg-type]
        n = len(active)
        if self.scale == "absolute":  # k needs neither ‖g‖ nor ⟨g,Δ⟩: bias first, then one reduction
            k = torch.full((n,), self.alpha, device=self.device)
            _bend(grads, deltas, k * factors)
            sums = global_sums(torch.cat([_norms(grads, self.device) ** 2, other_sq]), sharded + other_sharded, self.params)
            new_sq = sums[:n]
        else:
            dots = torch.stack([_dot(g, d).to(self.device) for g, d in zip(grads, deltas)]) if n else torch.zeros(0)
            partial = torch.cat([_norms(grads, self.device) ** 2, dots * factors, other_sq])
            sums = global_sums(partial, sharded + sharded + other_sharded, self.params)
            g_sq, dot = sums[:n], sums[n : 2 * n]
            k = _coefficients(g_sq.sqrt(), dot, delta_norms, self.alpha, self.scale)
            _bend(grads, deltas, k * factors)
            new_sq = (g_sq - 2 * k * dot + k * k * delta_norms * delta_norms).clamp_min(0.0)
        total = None
        if norms_of:
            wanted = torch.tensor([id(self.params[i]) in {id(p) for p in norms_of} for i in active], device=self.device)
            total = ((new_sq * wanted).sum() + sums[len(sums) - len(others) :].sum()).sqrt()
        mean = float(k.mean()) if n else 0.0  # one host sync per step
        return DriftStats(n, skipped, mean, total)

    def attach(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> Any:
        """Apply DRIFT (then clip to ``max_grad_norm`` if given) before every ``optimizer.step()``.

        For loops you do not control. Returns the hook handle (``.remove()`` detaches).
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            stats = self.apply(norms_of=params if max_grad_norm else ())
            if max_grad_norm:
                clip_grad_norm(params, max_grad_norm, stats.total_norm)

        return optimizer.register_step_pre_hook(hook)


def _bend(grads: list[torch.Tensor], deltas: list[torch.Tensor], coefficients: torch.Tensor) -> None:
    """g ← g − c·Δ in place for each (local) gradient, in the gradient's dtype (fp32 maths)."""
    for g, d, c in zip(grads, deltas, coefficients):
        if g.dtype == torch.float32:
            g.addcmul_(d, c.to(g.device), value=-1.0)  # no full-size temporary
        else:
            g.copy_((g.float() - d.float() * c.to(g.device)).to(g.dtype))


def _local_delta(name: str, delta: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """Δ as this rank holds it: the parameter's local rows, on the parameter's device, in the
    dtype Δ came in (a whole Δ for a sharded parameter is cut to those rows)."""
    delta = delta.detach()
    if is_sharded(param) and tuple(delta.shape) == tuple(param.shape):
        start, stop = row_range(param)
        delta = delta[start:stop]
    want = tuple(local(param).shape)
    if tuple(delta.shape) != want:
        raise ConfigError("prior", f"Δ for {name} has shape {tuple(delta.shape)}, the parameter {tuple(param.shape)}")
    return delta.to(local(param).device).contiguous()


def squared_norm(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The squared global L2 norm of the parameters' gradients (0-dim fp32; one all-reduce at
    most, for sharded gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = local(grads[0]).device
    partial = _norms([local(g) for g in grads], device) ** 2
    return global_sums(partial, [is_sharded(g) for g in grads], grads).sum()


def clip_grad_norm(
    params: Iterable[torch.nn.Parameter], max_norm: float, total: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (same coefficient, max_norm/(total+1e-6) capped at 1)
    for plain and sharded gradients alike. ``total``: the global norm when already known
    (``DriftStats.total_norm``), so the gradients are not read once more. Returns the total norm
    before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if total is None:
        total = squared_norm(params).sqrt()
    grads = [local(p.grad) for p in params]  # type: ignore[arg-type]
    device = grads[0].device
    torch._foreach_mul_(grads, (max_norm / (total.to(device) + 1e-6)).clamp(max=1.0))
    return total


def prior_deltas(p: Any, parameters: dict[str, torch.Tensor], skip: set[str] | frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """``(name, parameter, Δ, ‖θ_VLM‖)`` for each parameter an open prior ``p`` has Δ for (by
    LM-relative name), Δ shaped like the parameter and on its device, only the rows a sharded
    parameter holds on this process. Per-expert Δ of experts the model fuses in memory are
    stacked like the fused parameter ([E, 2f, d] / [E, d, f]), fused Δ stored in the released
    orientation transposed. ``skip``: names not to read (left out even when the prior covers them).
    ConfigError when a prior tensor (outside ``skip``) has no parameter, or shapes disagree."""
    from surgeon.anatomy.experts import fused_groups

    by_rel = {p.relative(n): n for n in p.names}
    fused = fused_groups([r for r in by_rel if r not in parameters], parameters)
    covered = {r for experts in fused.values() for rels in experts.values() for r in rels}
    missing = [r for r in by_rel if r not in parameters and r not in covered and r not in skip]
    if missing:
        raise ConfigError(
            "prior", f"{len(missing)} of the prior's {len(p.names)} tensors have no parameter in the model, e.g. {missing[0]}",
            "use a prior computed for this model's language model",
        )  # fmt: skip
    for rel, experts in fused.items():  # per-expert Δ, fused like the parameter ([E, 2f, d] / [E, d, f])
        if rel in skip:
            continue
        param = parameters[rel]
        start, stop = row_range(param)
        rows = [torch.cat([p.read_rows(by_rel[r], 0, p.shape(by_rel[r])[0]) for r in experts[e]]) for e in range(start, stop)]
        delta = torch.stack(rows) if rows else torch.empty((0, *param.shape[1:]))
        if tuple(delta.shape[1:]) != tuple(param.shape[1:]) or len(experts) != param.shape[0]:
            raise ConfigError("prior", f"Δ for the experts of {rel} has shape {tuple(delta.shape[1:])}, the parameter {tuple(param.shape)}")
        norm = sum(p.vlm_norm(by_rel[r]) ** 2 for rels in experts.values() for r in rels) ** 0.5
        yield rel, param, delta.to(local(param).device), norm
    for name in p.names:
        rel = p.relative(name)
        if rel in covered or rel in skip:
            continue
        param = parameters[rel]
        stored, want = tuple(p.shape(name)), tuple(param.shape)
        # fused MoE experts saved as [E, d, 2f] / [E, f, d] train as [E, 2f, d] / [E, d, f]
        swapped = stored != want and len(stored) == 3 and (stored[0], stored[2], stored[1]) == want
        if stored != want and not swapped:
            raise ConfigError("prior", f"Δ for {rel} has shape {stored}, the parameter {want}")
        start, stop = row_range(param)
        delta = p.read_rows(name, start, stop)
        if swapped:
            delta = delta.transpose(1, 2).contiguous()
        yield rel, param, delta.to(local(param).device), p.vlm_norm(name)
