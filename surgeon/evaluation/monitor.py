"""Evaluation while a model trains: each eval set's accuracy, and KL(base ‖ current) on a fixed
batch of text-only prompts, the quantity that predicts forgetting (arXiv 2509.04259).

    monitor = Monitor(["gsm=gsm.jsonl"], every=100, encoder=encoder)
    monitor.start(model)                                  # the base model's next-token distributions, kept
    if monitor.due(step): metrics.update(monitor(model))  # {"eval/gsm/accuracy": …, "kl_base": …}

KL(base ‖ current) = mean over the prompts' positions of Σ_v p_base(v) (log p_base(v) − log p_current(v)),
exact: the base's log-probabilities of the batch are kept (bf16), the batch sized so that they take
at most ``KL_BYTES``. The prompts: the first text-only prompts of the eval sets, else of ``fallback``
rows. Several processes: each answers its share of the items (a sharded model's processes
generate in step, with as many batches each) and the counts are summed; the KL batch runs on every
process alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from surgeon.evaluation.generate import Generator, Item, read_items

KL_BYTES = 128 * 2**20  # the base model's kept log-probabilities (bf16)
KL_PROMPTS = 8  # prompts in the fixed batch (at most)


class Monitor:
    """Training-time evaluation of a model (see the module docstring)."""

    def __init__(
        self, sets: Sequence[str], every: int, encoder: Any, limit: int | None = 200, max_new_tokens: int = 128, batch_size: int = 8,
        answer_regex: str | None = None, fallback: Sequence[Item] = (), reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        rank: int = 0, world: int = 1, synced: bool = False,
    ) -> None:  # fmt: skip
        self.sets = {name: items for name, items in ((spec.split("=", 1)[0].strip(), read_items(spec, limit)[0]) for spec in sets)}
        self.every, self.encoder = every, encoder
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.pattern = re.compile(answer_regex) if answer_regex else None
        self.reduce, self.rank, self.world, self.synced = reduce, rank, world, synced
        texts = [item for items in self.sets.values() for item in items if not item.images] or [i for i in fallback if not i.images]
        self.kl_items = texts[:KL_PROMPTS]
        self.base: torch.Tensor | None = None
        self.kl_inputs: dict[str, torch.Tensor] | None = None

    def due(self, step: int, total: int) -> bool:
        """Whether to evaluate after optimiser step ``step`` (1-based): every ``every`` and the last."""
        return step % self.every == 0 or step == total

    @torch.no_grad()
    def start(self, model: Any) -> None:
        """Keep the base model's log-probabilities on the fixed text-only batch (before any step)."""
        if not self.kl_items:
            return
        self.kl_inputs = self._kl_batch(model)
        self.base = self._log_probs(model).to(torch.bfloat16)

    @torch.no_grad()
    def __call__(self, model: Any) -> dict[str, float]:
        """The metrics of the model as it is now (every process calls it)."""
        from surgeon.evaluation.run import score

        training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        try:
            for name, items in self.sets.items():
                mine = list(items[self.rank :: self.world])
                batches = -(-len(items) // (self.batch_size * self.world)) if self.synced else None
                generator = Generator(model, self.encoder, self.max_new_tokens, self.batch_size, synced=self.synced)
                rows = score(generator(mine, batches=batches), mine, "current", self.pattern)
                counts = torch.tensor([sum(1 for r in rows if r["correct"]), sum(1 for r in rows if r["correct"] is not None)], dtype=torch.float64)
                counts = self.reduce(counts) if self.reduce is not None and self.world > 1 else counts
                metrics[f"eval/{name}/accuracy"] = float(counts[0] / counts[1]) if counts[1] else 0.0
                metrics[f"eval/{name}/n"] = float(counts[1])
            if self.base is not None:
                metrics["kl_base"] = self._kl(model)
        finally:
            model.train(training)
        return metrics

    def _kl_batch(self, model: Any) -> dict[str, torch.Tensor]:
        tokenizer = self.encoder.tokenizer
        prompts = [self.encoder.prompt(item.prompt) for item in self.kl_items]
        vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else len(tokenizer)
        longest = max(8, KL_BYTES // (2 * vocab * len(prompts)))
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            batch = tokenizer(prompts, padding=True, truncation=True, max_length=longest, return_tensors="pt", add_special_tokens=False)
        finally:
            tokenizer.padding_side = side
        device = next(model.parameters()).device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    def _log_probs(self, model: Any) -> torch.Tensor:
        logits = model(**self.kl_inputs).logits.float()  # type: ignore[arg-type]
        return torch.log_softmax(logits, dim=-1)

    def _kl(self, model: Any) -> float:
        current = self._log_probs(model)
        base = self.base.float()  # type: ignore[union-attr]
        per_position = (base.exp() * (base - current)).sum(-1)
        mask = self.kl_inputs["attention_mask"].bool()  # type: ignore[index]
        return float(per_position[mask].mean())
