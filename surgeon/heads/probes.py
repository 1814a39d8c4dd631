"""Head-influence probes of ``surgeon score-heads`` (docs/methods.md §4): one class and one ``PROBES`` entry each.

A probe attaches to a frozen model through hooks on the value projections, adds parameters that
act at visual tokens only and leave the forward pass unchanged (gates at 0, or B = 0), and after
each backward pass of the answer-token loss reports that batch's score contribution, shape
``[layers, kv_heads]``. ``surgeon.heads.score.score_heads`` sums the contributions over the probe batches.

    probe = PROBES["gate"](model, token_context(model), seed=0)
    handles = probe.attach(model)
    loss.backward(); scores += probe.batch_scores(); probe.zero_grad()

Adding a probe: a class with ``__init__(model, context, seed)``, ``attach(model) -> handles`` and
``batch_scores() -> Tensor[L, H_kv]``, plus one entry in ``PROBES``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from surgeon.modules import modeling_surgeon as modeling


class Probe(Protocol):
    def attach(self, model: nn.Module) -> list[Any]: ...

    def batch_scores(self) -> torch.Tensor: ...


class GateProbe(modeling.VisualValueEdit):
    """``gate`` (as released by the authors): per layer a gate g ∈ R^{H_kv} at 0; values at visual
    tokens are scaled V[t,h] ← V[t,h]·(1+g_h); score[l,h] = (∂L/∂g_{l,h})² per batch."""

    def __init__(self, model: nn.Module, context: modeling.TokenContext, seed: int = 0) -> None:
        _, kv, head_dim = modeling.value_dims(model)
        super().__init__(context, kv, head_dim)
        self.num_layers = len(modeling.decoder_of(model)[1])
        self.gates = nn.Parameter(torch.zeros(self.num_layers, kv, dtype=torch.float32))

    def attach(self, model: nn.Module) -> list[Any]:
        return self.hook_layers(model, list(range(self.num_layers)))

    def edit(self, layer: int, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.gates[layer].to(values.device)
        return (values.float() * scale[None, :, None]).to(values.dtype)

    def batch_scores(self) -> torch.Tensor:
        grad = self.gates.grad
        return torch.zeros(self.gates.shape) if grad is None else grad.detach().float().pow(2).cpu()


class Rank1Probe(nn.Module):
    """``rank1`` (the paper's description): a rank-1 Image-LoRA on every KV head of every layer,
    A ~ N(0, 1) random and fixed, B_h = 0 (α = r = 1, γ = 1); score[l,h] = ‖∂L/∂B_{l,h}‖² per batch.
    The constant 1/√H_kv factor of the adapter is the same in every layer, so it scales all
    scores alike."""

    def __init__(self, model: nn.Module, context: modeling.TokenContext, seed: int = 0) -> None:
        super().__init__()
        hidden, kv, head_dim = modeling.value_dims(model)
        layers = len(modeling.decoder_of(model)[1])
        settings = {
            "heads": [list(range(kv))] * layers, "rank": 1, "alpha": 1.0, "gamma": 1.0, "seed": seed,
            "hidden_size": hidden, "num_kv_heads": kv, "head_dim": head_dim,
        }  # fmt: skip
        self.adapter = modeling.ImageLoraModule(settings, model, context)
        for name, p in self.adapter.named_parameters():
            p.requires_grad_(name.endswith(".up"))

    def attach(self, model: nn.Module) -> list[Any]:
        return self.adapter.attach(model)

    def batch_scores(self) -> torch.Tensor:
        rows = []
        for layer in self.adapter.layers.values():
            up: torch.Tensor = layer.up  # type: ignore[assignment]
            rows.append(torch.zeros(up.shape[0]) if up.grad is None else up.grad.detach().float().pow(2).sum((1, 2)).cpu())
        return torch.stack(rows)


PROBES: dict[str, type] = {
    "gate": GateProbe,
    "rank1": Rank1Probe,
}
