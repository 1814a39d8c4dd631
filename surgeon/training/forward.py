"""One micro-batch through the model to its perception/reasoning span losses.

    forward = Forward(model, config, engine, placeholder_ids)
    with forward.micro_batch(batch) as inputs:          # a packed row's positions and segments (through backward)
        losses = forward.losses(inputs, labels, mask, totals)
        backward(combine(losses, lam))

With the chunked loss (default) the LM head's input is caught and the head applied chunk by chunk
(``surgeon.perception.chunked``), so the ``[tokens × vocabulary]`` logits never exist; the head
the model would apply is checked once against the model's own logits on a few text tokens, and a
model that transforms its logits in a way the chunks do not reproduce trains on full logits (and
says so) instead of on wrong ones. The head is used after the model's forward, where a sharded
model's hooks would not gather it for a second backward pass (dynamic λ), so the engine keeps the
unit that holds it gathered until the step's gradients are done (``keep_head_gathered``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from surgeon.perception.chunked import Head, head_span_losses
from surgeon.perception.reweight import SpanLosses, span_losses
from surgeon.training.config import TrainConfig

_CHECK_TOKENS = 16  # text tokens the head is checked on


class Forward:
    """The forward pass and loss of a run (see the module docstring)."""

    def __init__(self, model: Any, config: TrainConfig, engine: Any, placeholder_ids: frozenset[int], status: Callable[[str], None]) -> None:
        from surgeon.training.attention import Packer, check_packable

        self.model, self.engine, self.status = model, engine, status
        base = engine.unwrap(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        self.packer = Packer(base, check_packable(base.config.to_dict())) if config.packing else None
        self.head_module = base.get_output_embeddings() if config.chunked_loss else None
        text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.placeholders = torch.tensor(sorted(placeholder_ids), dtype=torch.long)
        self.checked = self.head_module is None
        if self.head_module is not None:
            engine.keep_head_gathered(base)

    @contextlib.contextmanager
    def micro_batch(self, batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """The model inputs of ``batch``; for a packed row, with its segments set until the block
        ends (the backward, which may recompute activations, belongs inside it)."""
        if self.packer is None:
            yield batch
            return
        with self.packer.row(batch) as inputs:
            yield inputs

    def losses(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, mask: torch.Tensor, totals: tuple[int, int], params: list) -> SpanLosses:
        """The span losses of one micro-batch, normalised by the step's ``totals``."""
        if not self.checked:
            self._check(inputs)
        with self.engine.autocast():
            if self.head_module is None:
                out = self.model(**inputs).logits
            else:
                with _caught(self.head_module) as caught:
                    stand_in = self.model(**inputs).logits
                out = caught.hidden
        if not out.requires_grad:  # a text-only batch when only visual-token adapters train
            out = out + sum(p.sum() for p in params) * 0.0  # same values, zero gradients
        labels, mask = labels.to(out.device), mask.to(out.device)
        if self.head_module is None:
            return span_losses(out, labels, mask, totals=totals)
        with self.engine.autocast():  # the head's products in the dtype the model's own head would use
            losses = head_span_losses(out, self._head(), labels, mask, totals=totals)
        # Every backward enters through the model's output first, as it does from the logits, so
        # that a sharded model's root unit runs its pre-backward at the same point on every process
        # (else only where an image's features lead into it, mid-pass: the collectives would part).
        anchor = stand_in.float().sum() * 0.0 if stand_in.requires_grad else 0.0
        return replace(losses, perception=losses.perception + anchor, reasoning=losses.reasoning + anchor)

    def _head(self) -> Head:
        h = self.head_module
        return Head(h.weight, getattr(h, "bias", None), self.softcap)  # type: ignore[union-attr]

    def _check(self, inputs: dict[str, torch.Tensor]) -> None:
        """Compare the chunked head with the model's logits on up to 16 text tokens of the batch;
        every process agrees on the verdict (the same forwards run everywhere)."""
        self.checked = True
        ids = inputs["input_ids"][0]
        ids = ids[~torch.isin(ids.cpu(), self.placeholders).to(ids.device)][:_CHECK_TOKENS].unsqueeze(0)
        with torch.no_grad(), self.engine.autocast():
            reference = self.model(input_ids=ids).logits[0].float()
            with _caught(self.head_module) as caught:
                self.model(input_ids=ids)
            ours = self._head().logits(caught.hidden[0], _autocast_dtype(ids.device))
        scale = float(reference.abs().max()) or 1.0
        ok = bool(ours.shape == reference.shape and (ours - reference).abs().max() <= 1e-3 * scale)
        ok = float(self.engine.all_reduce(torch.tensor([float(not ok)], device=self.engine.device))[0]) == 0.0  # every process agrees
        if not ok:
            self.head_module = None
            self.status("this model's logits are not its head's output as surgeon computes it; training on full logits instead")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class _Caught:
    hidden: torch.Tensor

    def __init__(self, head: torch.nn.Module, config: Any = None) -> None:
        self.head, self.config = head, config


@contextlib.contextmanager
def _caught(head: torch.nn.Module, config: Any = None) -> Iterator[_Caught]:
    """While the block runs, ``head`` keeps its input (``caught.hidden``) and returns a [.., 1]
    stand-in instead of the logits. ``config``: the text config the head belongs to (soft cap)."""
    caught = _Caught(head, config)

    def keep(hidden: torch.Tensor) -> torch.Tensor:
        caught.hidden = hidden
        return hidden[..., :1] * 0.0  # attached to the graph, so that the model's output leads into it

    head.forward = keep  # type: ignore[method-assign]
    try:
        yield caught
    finally:
        del head.forward
