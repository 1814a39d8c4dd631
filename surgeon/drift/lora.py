"""DRIFT through LoRA adapters (surgeon's extension; derivation in docs/methods.md §6).

With W = W₀ + s·B·A (A: r×in, B: out×r, s = α/r) and G = ∂L/∂W the full-weight gradient, the
factors' gradients are s·G·Aᵀ and s·Bᵀ·G. DRIFT's biased gradient is G′ = G − k·Δ (k from ‖G‖,
⟨G,Δ⟩, ‖Δ‖ and α by the scale, as for full weights), so the factors should receive

    s·G′·Aᵀ = s·G·Aᵀ − k·s·Δ·Aᵀ        s·Bᵀ·G′ = s·Bᵀ·G − k·s·Bᵀ·Δ

The first terms are what autograd gives LoRA; the corrections need only Δ, A, B and the scalar
k, never G itself. k needs ‖G‖ and ⟨G,Δ⟩: during the backward, each adapted module's full-weight
gradient of the micro-batch, G_m = Dᵀ·X (its output gradient and input, handed over by an identity
function on the module's output that keeps the input as autograd keeps it anyway), is formed for
that module alone, reduced to those two numbers, and dropped; so G never exists for more than one
module at a time. k_m is summed per module over the micro-batches and processes of the step (K), and at the
optimiser step each adapter gets −K·s·Δ·Aᵀ and −K·s·Bᵀ·Δ. With one micro-batch on one process
this is exactly DRIFT on G; with accumulation or several processes, the gradnorm and
adaptive_cosine scales see each micro-batch's G apart (as the reference code's DRIFT did), since
‖Σ G_m‖ would need the whole G summed over the step. ``absolute`` (k = α, no G needed) is applied
once per step: exact for any split. ``alpha = 0`` changes nothing, bit for bit.

    drift = LoraDrift.from_prior(peft_model, "prior/", alpha=1.0, scale="adaptive_cosine")
    … forward, backward (hooks measure k) …
    drift.apply()                                   # before clipping and the optimiser step
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgeon.drift.bias import EPS, DriftStats, _check_scale, _coefficients
from surgeon.dtensor import is_sharded, local, row_range
from surgeon.errors import ConfigError


@dataclass
class _Adapter:
    """One adapted linear: its LM-relative weight name, the peft module, Δ (this rank's rows), Δ's factor."""

    name: str
    module: Any
    delta: torch.Tensor
    factor: float
    norm: float = 0.0  # ‖factor·Δ‖ over all rows
    k: float = 0.0  # Σ of this step's k_m so far (this process)
    rows: int = 0  # the weight's rows (Δ holds this rank's share of them when ``group`` is set)
    group: Any = None  # the process group its rows are sharded over (FSDP2), else None


class LoraDrift:
    """DRIFT for the LoRA adapters of a peft model (see the module docstring)."""

    def __init__(self, adapters: list[_Adapter], alpha: float, scale: str, reduce: Any = None, grad_scale: float = 1.0) -> None:
        _check_scale(scale)
        if not adapters:
            raise ConfigError("prior", "no LoRA-adapted weight of the model has Δ in the prior", "adapt the modules the prior covers (--modules)")
        self.adapters, self.alpha, self.scale, self.reduce = adapters, float(alpha), scale, reduce
        self.grad_scale = float(grad_scale)
        self.names = [a.name for a in adapters]
        self.params = [p for a in adapters for p in (_a(a.module).weight, _b(a.module).weight)]
        self.zero: list[str] = []
        self._handles = [h for a in adapters for h in self._hook(a)]

    @classmethod
    def from_prior(cls, model: Any, prior: str | Path, alpha: float = 1.0, scale: str = "adaptive_cosine", normalize: bool = True,
                   reduce: Any = None, grad_scale: float = 1.0) -> LoraDrift:  # fmt: skip
        """The adapters of ``model`` (a peft LoRA model, sharded by FSDP2 or not) matched to the
        prior's tensors by LM-relative name (``layers.3.self_attn.q_proj.weight``); Δ read for
        this rank's rows of each base weight. ``reduce``: an in-place sum over processes.
        ``grad_scale``: what turns the gradients the backward pass sees into the loss's (1/world
        under DDP, whose backward runs on the loss times the world size)."""
        from peft.tuners.lora import LoraLayer

        from surgeon.anatomy.decoder import lm_parameters
        from surgeon.drift.prior import open_prior

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        modules = {id(m.base_layer.weight): m for m in base.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")}
        for m in modules.values():
            if getattr(m, "use_dora", {}).get("default", False):
                raise ConfigError("prior", "DRIFT through LoRA takes plain LoRA adapters, not DoRA", "train without use_dora")
        names = {n.replace(".base_layer.", "."): p for n, p in lm_parameters(base) if id(p) in modules}
        adapters = []
        with open_prior(prior) as p:
            by_rel = {p.relative(n): n for n in p.names}
            for rel, weight in names.items():
                if rel not in by_rel:
                    continue
                start, stop = row_range(weight)
                stored = tuple(p.shape(by_rel[rel]))
                if stored != tuple(weight.shape):
                    raise ConfigError("prior", f"Δ for {rel} has shape {stored}, the weight {tuple(weight.shape)}")
                delta = p.read_rows(by_rel[rel], start, stop).to(local(weight).device)
                raw = float(torch.linalg.vector_norm(delta.float())) ** 2
                group = weight.device_mesh.get_group() if is_sharded(weight) else None  # (recorded now: FSDP unshards it in backward)
                adapters.append(_Adapter(rel, modules[id(weight)], delta, p.vlm_norm(by_rel[rel]) if normalize else -1.0, raw,
                                         rows=weight.shape[0], group=group))  # fmt: skip
        drift = cls(adapters, alpha, scale, reduce, grad_scale)
        drift._norms([a.group is not None for a in adapters])
        return drift

    def _norms(self, sharded: list[bool]) -> None:
        """‖Δ‖ over all rows (one reduction), the normalisation factor, and Δ = 0 left out."""
        raw = torch.tensor([a.norm for a in self.adapters], dtype=torch.float64)
        if any(sharded) and self.reduce is not None:
            raw = self.reduce(raw)
        keep = []
        for a, sq in zip(self.adapters, raw.tolist()):
            norm = sq**0.5
            if norm == 0:
                self.zero.append(a.name)
                continue
            a.factor = a.factor / max(norm, EPS) if a.factor >= 0 else 1.0
            a.norm = norm * a.factor
            keep.append(a)
        if not keep:
            raise ConfigError("prior", "every Δ the adapters would use is zero", "compute the prior from two different models")
        for handle in self._handles:
            handle.remove()
        self.adapters = keep
        self.names = [a.name for a in keep]
        self._handles = [h for a in keep for h in self._hook(a)]

    # ------------------------------------------------------------------ during the backward

    def _hook(self, adapter: _Adapter) -> list[Any]:
        if self.alpha == 0.0 or self.scale == "absolute":
            return []  # no k to measure: applied once per step from α alone

        def forward(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                return output
            return _Tap.apply(output, args[0], lambda grad, x: self._measure(adapter, grad, x))

        return [adapter.module.register_forward_hook(forward)]

    @torch.no_grad()
    def _measure(self, adapter: _Adapter, grad: torch.Tensor, x: torch.Tensor) -> None:
        """k of this micro-batch from the module's full-weight gradient G = Dᵀ·X, formed and dropped here."""
        d = grad.reshape(-1, grad.shape[-1]).float()
        g = (d.t() @ x.reshape(-1, x.shape[-1]).float()).mul_(self.grad_scale)  # [out, in]
        delta = self._full_delta(adapter)
        g_norm = torch.linalg.vector_norm(g)
        dot = torch.dot(g.reshape(-1), delta.reshape(-1).float()) * adapter.factor
        k = _coefficients(g_norm.reshape(1), dot.reshape(1), torch.tensor([adapter.norm]), self.alpha, self.scale)
        adapter.k += float(k[0])

    def _full_delta(self, adapter: _Adapter) -> torch.Tensor:
        """Δ of the whole weight: this rank's rows, with the other ranks' gathered under FSDP."""
        if adapter.group is None:
            return adapter.delta
        import torch.distributed as dist

        group = adapter.group
        chunk = -(-adapter.rows // dist.get_world_size(group))
        padded = torch.zeros((chunk, *adapter.delta.shape[1:]), dtype=adapter.delta.dtype, device=adapter.delta.device)
        padded[: adapter.delta.shape[0]] = adapter.delta
        out = torch.empty((chunk * dist.get_world_size(group), *adapter.delta.shape[1:]), dtype=padded.dtype, device=padded.device)
        dist.all_gather_into_tensor(out, padded, group=group)
        return out[: adapter.rows]

    # ------------------------------------------------------------------ at the optimiser step

    @torch.no_grad()
    def apply(self, norms_of: Any = ()) -> DriftStats:
        """Add −K·s·Δ·Aᵀ to each B's gradient and −K·s·Bᵀ·Δ to each A's (K summed over the
        step's micro-batches and processes), then reset the step's k; ``norms_of`` is accepted
        for ``Drift.apply``'s signature (clipping measures afterwards)."""
        if self.alpha == 0.0:
            return DriftStats(0, 0, 0.0, None)
        ks = torch.tensor([self.alpha if self.scale == "absolute" else a.k for a in self.adapters], dtype=torch.float64)
        if self.scale != "absolute" and self.reduce is not None:
            ks = self.reduce(ks)
        for a, k in zip(self.adapters, ks.tolist()):
            a.k = 0.0
            self._bend(a, k)
        return DriftStats(len(self.adapters), 0, float(ks.mean()), None)

    def _bend(self, adapter: _Adapter, k: float) -> None:
        module = adapter.module
        lora_a, lora_b = _a(module).weight, _b(module).weight
        s = float(module.scaling["default"])
        delta = adapter.delta.float() * adapter.factor  # this rank's rows of Δ (all rows when replicated)
        a_full = lora_a.full_tensor() if is_sharded(lora_a) else lora_a.detach()
        if lora_b.grad is not None:
            local(lora_b.grad).sub_((k * s) * (delta @ a_full.float().t()).to(lora_b.grad.dtype))
        b_rows = local(lora_b.detach()) if is_sharded(lora_b) else lora_b.detach()
        bt_delta = b_rows.float().t() @ delta  # [r, in]: these rows' share of Bᵀ·Δ
        if is_sharded(lora_b):
            import torch.distributed as dist

            dist.all_reduce(bt_delta, group=lora_b.device_mesh.get_group())
        if lora_a.grad is not None:
            start, stop = row_range(lora_a)
            local(lora_a.grad).sub_((k * s) * bt_delta[start:stop].to(lora_a.grad.dtype))

    @property
    def numel(self) -> int:
        """Parameters whose gradients are biased (the adapters')."""
        return sum(p.numel() for p in self.params)

    @property
    def local_bytes(self) -> int:
        """Bytes of Δ held by this process."""
        return sum(a.delta.numel() * a.delta.element_size() for a in self.adapters)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Tap(torch.autograd.Function):
    """The identity on a module's output that keeps its input as a saved tensor (the same storage
    autograd keeps for LoRA's A; recomputed under activation checkpointing) and, in backward,
    hands the output's gradient and that input to ``measure``."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, x: torch.Tensor, measure: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.measure = measure
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        ctx.measure(grad, x)
        return grad, None, None


def _a(module: Any) -> Any:
    return module.lora_A["default"]


def _b(module: Any) -> Any:
    return module.lora_B["default"]
