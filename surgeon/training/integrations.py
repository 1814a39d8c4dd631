"""DRIFT and perception/reasoning weighting inside the Hugging Face Trainer and TRL's SFTTrainer.

    from surgeon import DriftCallback, PerceptionCollator, PerceptionLoss, freeze_vision

    freeze_vision(model)                                                             # the LM trains, as surgeon train
    collator = PerceptionCollator("Qwen/Qwen2.5-VL-7B-Instruct", max_length=4096)   # <perception> tags -> masks
    trainer = SFTTrainer(model=model, args=SFTConfig(..., remove_unused_columns=False,
                                                     dataset_kwargs={"skip_prepare_dataset": True}),
                         train_dataset=rows, data_collator=collator)
    DriftCallback("prior/", alpha=1.0, scale="adaptive_cosine").attach(trainer)
    PerceptionLoss(0.3).attach(trainer)                                            # optional: λ·L_p + (1−λ)·L_r
    trainer.train()

``DriftCallback`` builds Δ at train begin, from the model the trainer trains, on its parameters'
devices (after the trainer placed or sharded the model), and bends the accumulated gradient once
per optimiser step (``on_pre_optimizer_step``), before clipping: it takes over the trainer's
``max_grad_norm`` (set to 0 while training, restored at the end) and clips after DRIFT with the
same norm. ``attach`` also gives the trainer ``surgeon train``'s loss (``PerceptionLoss(None)``:
cross-entropy over the step's supervised tokens) unless a ``PerceptionLoss`` is attached; only
listed in ``callbacks``, it warns when the trainer would average the loss per micro-batch. With
``alpha == 0`` it changes no gradient. Not for fp16 loss scaling (bf16 or fp32), and refused
under DeepSpeed (ZeRO keeps the gradients in its own partitions).

``PerceptionCollator`` turns rows in the TRL ``messages`` (+ ``images``) or ShareGPT layout, with
``<perception>`` tags or a ``perception_regex``, into batches with the model's processor and chat
template (as ``surgeon train`` encodes them); the perception flag travels inside ``labels``
(``PERCEPTION_OFFSET`` is added to perception tokens' ids) because the trainer passes only
``labels`` to its loss. ``PerceptionLoss`` (a ``compute_loss_func``) decodes them and normalises each
span by its token count over the whole optimiser step and all processes, as ``surgeon train``
does; ``attach`` makes the trainer count both spans when it counts ``num_items_in_batch``.
Dynamic λ needs two backward passes per micro-batch: use ``surgeon train --perception-weight
dynamic`` for it. docs/integrations.md says what to set for results equal to ``surgeon train``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from surgeon.drift.bias import SCALES, Drift, clip_grad_norm
from surgeon.errors import ConfigError
from surgeon.perception.reweight import IGNORE_INDEX, combine, span_losses

PERCEPTION_OFFSET = 1 << 40  # added to a perception token's label id (ids stay far below it)


class DriftCallback(TrainerCallback):
    """DRIFT for ``transformers.Trainer`` / ``trl.SFTTrainer`` (see the module docstring)."""

    def __init__(self, prior: str | Path, alpha: float = 1.0, scale: str = "adaptive_cosine", normalize: bool = True) -> None:
        self.trainer: Any = None  # set by attach()
        self.token_loss = False  # a PerceptionLoss normalises the trainer's loss by the step's tokens
        if scale not in SCALES:
            raise ConfigError("drift_scale", f"unknown scale {scale!r}", f"choose one of {', '.join(SCALES)}")
        if not alpha >= 0:
            raise ConfigError("drift_alpha", f"must be a finite number ≥ 0, got {alpha}")
        self.prior, self.alpha, self.scale, self.normalize = prior, float(alpha), scale, normalize
        self.drift: Any = None  # Drift (full weights) or LoraDrift (a peft LoRA model)
        self.max_grad_norm: float | None = None
        self.params: list[torch.nn.Parameter] = []
        self.last: Any = None

    def attach(self, trainer: Any) -> Any:
        """Add this callback to ``trainer`` and, unless a ``PerceptionLoss`` is attached by the time
        training begins, give the trainer the loss ``surgeon train`` uses: cross-entropy normalised
        by the supervised tokens of the whole optimiser step (``PerceptionLoss(None)``), whatever
        the model's ``accepts_loss_kwargs``. Returns the trainer."""
        self.trainer = trainer
        trainer.add_callback(self)
        return trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        _refuse_deepspeed(args)
        if self.trainer is not None and not isinstance(self.trainer.compute_loss_func, PerceptionLoss):
            PerceptionLoss(None).attach(self.trainer)  # marks this callback's token_loss
        if not self.token_loss:
            _warn_per_micro_batch_loss(args, model)
        if self.alpha == 0:
            return
        if getattr(args, "fp16", False):
            raise ConfigError("drift", "DRIFT acts on unscaled gradients, and fp16 training scales them", "train in bf16 or fp32")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(model, "peft_config") and not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n):
            from surgeon.drift.lora import LoraDrift  # a LoRA model: DRIFT through its adapters (docs/methods.md §6)

            world = getattr(args, "world_size", 1)
            reduce = None
            if world > 1:
                import torch.distributed as dist

                reduce = lambda t: (dist.all_reduce(t := t.to(args.device)), t.cpu())[1]  # noqa: E731
            # the Trainer averages gradients over processes: a process's share of the step's gradient is 1/world of its own
            self.drift = LoraDrift.from_prior(model, self.prior, self.alpha, self.scale, self.normalize, reduce, 1.0 / world)
        else:
            self.drift = Drift.from_prior(base, self.prior, alpha=self.alpha, scale=self.scale, normalize=self.normalize)
        if not any(p.requires_grad for p in self.drift.params):
            raise ConfigError(
                "drift", "none of the weights the prior biases trains", "train the language model's full weights (not a LoRA adapter)"
            )
        self.params = [p for p in model.parameters() if p.requires_grad]
        if args.max_grad_norm and args.max_grad_norm > 0:  # clip after DRIFT, not before it
            self.max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.drift is None:
            return
        self.last = self.drift.apply(norms_of=self.params if self.max_grad_norm else ())
        if self.max_grad_norm:
            clip_grad_norm(self.params, self.max_grad_norm, self.last.total_norm)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None and self.last is not None and "loss" in logs:
            logs["drift_coefficient"] = self.last.mean_coefficient
            logs["drift_tensors"] = self.last.biased

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.max_grad_norm:
            args.max_grad_norm, self.max_grad_norm = self.max_grad_norm, None


def _refuse_deepspeed(args: Any) -> None:
    """DeepSpeed ZeRO keeps gradients in its own partitioned buffers (``param.grad`` stays empty),
    so a gradient bias applied to ``param.grad`` would do nothing: refused, never silent."""
    import os

    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) or launched:
        raise ConfigError(
            "DriftCallback", "does not run under DeepSpeed (ZeRO keeps the gradients DRIFT bends in its own partitions)",
            "shard with FSDP instead (accelerate launch --use_fsdp, or `surgeon train --fsdp`); docs/integrations.md has the recipe",
        )


def _warn_per_micro_batch_loss(args: Any, model: Any) -> None:
    """Say loudly when the trainer averages this model's loss per micro-batch: the update then
    weights the tokens of short micro-batches more than ``surgeon train`` does."""
    import warnings

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    split = getattr(args, "gradient_accumulation_steps", 1) > 1 or getattr(args, "world_size", 1) > 1
    if split and getattr(base, "accepts_loss_kwargs", True) is False:
        warnings.warn(
            f"DriftCallback: {type(base).__name__} does not accept loss kwargs, so the Trainer averages its loss per "
            "micro-batch and the update differs from surgeon train's; use DriftCallback(...).attach(trainer) (or "
            "PerceptionLoss(...).attach(trainer)) for the loss normalised by the step's tokens",
            stacklevel=2,
        )


def freeze_vision(model: Any) -> int:
    """Freeze the vision tower and projector (every parameter outside the language model, surgeon
    modules and LoRA factors aside), as ``surgeon train`` does without ``--train-vision``; the
    language model's parameters are left as they are. Returns the number of tensors frozen."""
    from surgeon.anatomy.decoder import lm_parameters

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = {id(p) for _, p in lm_parameters(base)}
    frozen = 0
    for name, p in base.named_parameters():
        if id(p) in lm or "lora_" in name or "surgeon" in name.split("."):
            continue
        p.requires_grad_(False)
        frozen += 1
    if not frozen:
        raise ConfigError("model", f"{type(base).__name__} has no parameters outside its language model", "freeze_vision is for VLMs; skip it for a text model")
    return frozen


def split_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, perception mask)`` from labels that carry the perception flag (``PERCEPTION_OFFSET``)."""
    mask = labels >= PERCEPTION_OFFSET
    return torch.where(mask, labels - PERCEPTION_OFFSET, labels), mask


class PerceptionLoss:
    """``compute_loss_func``: ``λ·L_p + (1−λ)·L_r`` with each span normalised by its tokens in the
    whole optimiser step (all micro-batches, all processes); ``lam=None`` is plain cross-entropy over
    the step's tokens (λ at the perception tokens' share). ``attach(trainer)`` installs it; a
    trainer given it only as ``compute_loss_func`` would never see the perception flags, so the
    loss refuses to run unattached.

    ``chunked`` (default): while the trainer computes a training loss, the model's LM head hands
    its input to this loss instead of computing logits, and the loss runs the head chunk by chunk
    (``surgeon.perception.chunked``), as ``surgeon train`` does: the ``[tokens × vocabulary]``
    logits never exist. Evaluation and prediction keep the model's own logits."""

    def __init__(self, lam: float | None, chunked: bool = True) -> None:
        if lam is not None and not 0.0 <= float(lam) <= 1.0:
            raise ConfigError("perception_weight", f"must lie in [0, 1], got {lam}")
        self.lam = None if lam is None else float(lam)  # None: plain cross-entropy over the step's tokens
        self.chunked = chunked
        self.counts: tuple[int, int] | None = None
        self.attached = False
        self._caught: Any = None  # the head's input while a chunked training loss is computed

    def attach(self, trainer: Any) -> Any:
        """Use this loss in ``trainer`` and count each span over every optimiser step (the trainer's
        ``PerceptionCollator`` then carries the perception flag in the labels); returns the trainer."""
        trainer.compute_loss_func = self
        self.attached = True
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, DriftCallback):
                callback.token_loss = True
        if isinstance(trainer.data_collator, PerceptionCollator):
            trainer.data_collator.carry_perception = True
        fetch = trainer.get_batch_samples

        def get_batch_samples(epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            batches, num_items = fetch(epoch_iterator, num_batches, device)
            counts = torch.zeros(2, dtype=torch.long)
            for batch in batches:
                labels, mask = split_labels(batch["labels"][..., 1:])
                supervised = labels != IGNORE_INDEX
                counts += torch.stack([(mask & supervised).sum(), (~mask & supervised).sum()]).cpu()
            if trainer.args.average_tokens_across_devices and trainer.args.world_size > 1:
                counts = trainer.accelerator.gather(counts.to(device)).view(-1, 2).sum(0).cpu()
            self.counts = (int(counts[0]), int(counts[1]))
            return batches, num_items

        trainer.get_batch_samples = get_batch_samples
        if self.chunked:
            self._catch_head(trainer)
        return trainer

    def _catch_head(self, trainer: Any) -> None:
        """Wrap ``trainer.compute_loss``: in training mode the model's head is caught (its input kept
        for this loss, a stand-in returned) for the duration of the trainer's own computation, so
        that everything the trainer does around the loss (scaling, averaging) is unchanged."""
        from surgeon.training.forward import _caught

        compute = trainer.compute_loss

        def compute_loss(model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            if not model.training:
                return compute(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            base = trainer.accelerator.unwrap_model(model)
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
            with _caught(base.get_output_embeddings(), text) as self._caught:
                try:
                    return compute(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
                finally:
                    self._caught = None

        trainer.compute_loss = compute_loss

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        if not self.attached and self.counts is None:
            raise ConfigError("PerceptionLoss", "is not attached to the trainer, so no label carries the perception span", "call loss.attach(trainer) before trainer.train()")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        labels, mask = split_labels(labels.to(logits.device))
        if self._caught is not None and getattr(self._caught, "hidden", None) is not None:
            from surgeon.perception.chunked import Head, head_span_losses

            head, text = self._caught.head, self._caught.config
            chunked = Head(head.weight, getattr(head, "bias", None), getattr(text, "final_logit_softcapping", None))
            losses = head_span_losses(self._caught.hidden, chunked, labels, mask, totals=self.counts)
        else:
            losses = span_losses(logits, labels, mask, totals=self.counts)
        if self.lam is None:  # the perception tokens' share: plain cross-entropy, as surgeon train without a weight
            n_p, n_r = losses.norm_perception, losses.norm_reasoning
            return combine(losses, n_p / max(n_p + n_r, 1))
        return combine(losses, self.lam)


class PerceptionCollator:
    """``data_collator`` for rows in the layouts ``surgeon train`` reads (TRL ``messages`` + ``images``,
    ShareGPT), as a ``datasets.Dataset`` gives them: images as PIL images, bytes or paths (relative to
    ``base``). Returns ``model(**batch)`` inputs; with ``carry_perception`` (set by
    ``PerceptionLoss.attach``) the ``labels`` carry the perception flag, which only PerceptionLoss
    reads (a model's own loss would see out-of-range ids)."""

    def __init__(
        self, model: str | Path | Any, max_length: int | None = 2048, perception_regex: str | None = None, base: str | Path = "."
    ) -> None:
        import re

        from surgeon.data.encoding import SampleEncoder

        self.encoder = model if isinstance(model, SampleEncoder) else SampleEncoder.from_pretrained(model, max_length=max_length)
        self.pattern = re.compile(perception_regex) if perception_regex else None
        self.base = Path(base).resolve()
        self.carry_perception = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from surgeon.data.formats import parse_record
        from surgeon.data.encoding import TooLong

        items = []
        for i, row in enumerate(rows):
            sample = parse_record(row, self.base, self.pattern, i + 1, "batch")
            try:
                items.append(self.encoder.encode(sample))
            except TooLong:
                continue
        if not items:
            raise ConfigError("max_length", "every sample of the batch is longer than max_length allows", "raise max_length")
        batch = self.encoder.collate(items)
        mask = batch.pop("perception_mask")
        if self.carry_perception:
            batch["labels"] = torch.where(mask, batch["labels"] + PERCEPTION_OFFSET, batch["labels"])
        return batch


class EvalCallback(TrainerCallback):
    """Training-time evaluation for the transformers Trainer and TRL, as ``surgeon train
    --eval-set … --eval-every N`` does it: every ``every`` steps and after the last, each set's
    accuracy by greedy generation (``surgeon eval``'s scoring) and KL(base ‖ current) on fixed
    text-only prompts, logged through the trainer (so they reach its tensorboard or W&B)::

        EvalCallback(["gsm=gsm.jsonl"], every=100, model="Qwen/Qwen2.5-VL-7B-Instruct").attach(trainer)
    """

    def __init__(self, sets: list[str], every: int, model: Any, limit: int | None = 200, max_new_tokens: int = 128, batch_size: int = 8) -> None:
        from surgeon.data.encoding import SampleEncoder

        if every < 1:
            raise ConfigError("every", f"must be at least 1, got {every}")
        self.sets, self.every, self.limit, self.max_new_tokens, self.batch_size = list(sets), every, limit, max_new_tokens, batch_size
        self.encoder = model if isinstance(model, SampleEncoder) else SampleEncoder.from_pretrained(model)
        self.trainer: Any = None
        self.monitor: Any = None

    def attach(self, trainer: Any) -> Any:
        """Add this callback to ``trainer`` (it logs through it); returns the trainer."""
        self.trainer = trainer
        trainer.add_callback(self)
        return trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from surgeon.evaluation.monitor import Monitor

        world, rank = args.world_size, args.process_index

        def reduce(t: torch.Tensor) -> torch.Tensor:
            return self.trainer.accelerator.reduce(t.to(self.trainer.accelerator.device), reduction="sum").cpu()

        self.monitor = Monitor(self.sets, self.every, self.encoder, self.limit, self.max_new_tokens, self.batch_size,
                               reduce=reduce, rank=rank, world=world, synced=world > 1)  # fmt: skip
        self.monitor.start(self._model(model))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.monitor is not None and self.monitor.due(state.global_step, state.max_steps):
            metrics = self.monitor(self._model(model))
            if self.trainer is not None:
                self.trainer.log(metrics)

    def _model(self, model: Any) -> Any:
        return self.trainer.accelerator.unwrap_model(model) if self.trainer is not None else model
