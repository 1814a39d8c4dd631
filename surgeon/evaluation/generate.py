"""Evaluation items from data rows, and their greedy completions by a model.

    items, stats = read_items("gsm=data/gsm.jsonl", limit=200)     # any row format ``surgeon train`` reads
    done = Generator(model, encoder, max_new_tokens=256, batch_size=8)(items)

An item is a row's conversation up to its last assistant message (the prompt: every turn before
it, images included), the reference (that message, perception tags removed, or the row's
``answer`` field, which wins), and the reference's perception spans (its tagged spans, or the
row's ``perception_reference`` field). Completions are greedy, with
the KV cache, in batches left-padded, from the prompt rendered by the model's own chat template
with its generation prompt; a completion ends at EOS or the template's end-of-turn token (cut
there, special tokens removed). An item whose image cannot be read is an error, listed, never a
wrong answer. ``synced``: processes that hold shards of one model generate in step (transformers'
``synced_gpus``), each on its own items, with as many batches as every other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from surgeon.data.samples import BadSample, DataStats, Sample, Turn
from surgeon.errors import ConfigError, DataError

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Item:
    """One question: where it is (``set``, ``id`` = its line), the prompt turns, the reference."""

    set: str
    id: int
    prompt: tuple[Turn, ...]
    reference: str | None
    perception: tuple[str, ...] = ()

    @property
    def images(self) -> list:
        return [p for t in self.prompt for p in t.parts if not isinstance(p, str)]


@dataclass(frozen=True)
class Completion:
    """A model's answer to an item: the rendered prompt, the decoded continuation, or the error
    that kept the item from being asked."""

    prompt: str
    generated: str
    error: str | None = None


def parse_set(spec: str) -> tuple[str, str]:
    """``NAME=DATA`` -> (name, data); ConfigError otherwise."""
    name, sep, data = spec.partition("=")
    if not sep or not name.strip() or not data.strip():
        raise ConfigError("sets", f"{spec!r} is not NAME=DATA", "write each set as --set NAME=DATA, e.g. --set gsm=data/gsm.jsonl")
    return name.strip(), data.strip()


def read_items(spec: str, limit: int | None = None, perception_regex: str | None = None) -> tuple[list[Item], DataStats]:
    """The items of one ``NAME=DATA`` set (the first ``limit``); DataError for a set in which no
    row has a reference."""
    from surgeon.data.scan import scan_samples

    name, data = parse_set(spec)
    stats = DataStats()
    scanned = scan_samples(data, perception_regex, skip_bad=True, max_samples=limit, stats=stats, supervised=False)
    items = [item for i in range(len(scanned)) if (item := item_from(name, scanned.sample(i))) is not None]
    if not items:
        raise DataError(data, f"set {name!r} has no row with a reference answer", "end each row with the assistant's answer, or give an 'answer' field")
    stats.used = len(items)
    return items, stats


def item_from(name: str, sample: Sample) -> Item | None:
    last = max((i for i, t in enumerate(sample.turns) if t.role == "assistant"), default=None)
    answer = sample.meta.get("answer")
    if last is None and answer is None:
        return None
    prompt = sample.turns if last is None else sample.turns[:last]
    if not any(t.role == "user" for t in prompt):
        return None
    turn = sample.turns[last] if last is not None else None
    reference = str(answer) if answer is not None else turn.text  # type: ignore[union-attr]
    spans = tuple(turn.text[a:b] for a, b in turn.perception) if turn is not None else ()
    given = sample.meta.get("perception_reference")
    if not spans and given:  # the row's own field, as the evidence study writes it
        spans = tuple(str(x) for x in (given if isinstance(given, list) else [given]))
    return Item(name, sample.line, tuple(prompt), reference, spans)


@dataclass
class Generator:
    """Greedy completions of items by one model (see the module docstring)."""

    model: Any
    encoder: Any  # surgeon.data.encoding.SampleEncoder of the model
    max_new_tokens: int = 256
    batch_size: int = 8
    synced: bool = False
    stops: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stops = self.encoder.stop_token_ids()
        tokenizer = self.encoder.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.stops[0] if self.stops else 0)

    def __call__(self, items: Sequence[Item], progress: Progress | None = None, batches: int | None = None) -> list[Completion]:
        """Completions in item order. ``batches``: run this many batches whatever the items
        (the synced processes of a sharded model: extra batches repeat an item, their answers dropped)."""
        out: list[Completion] = []
        count = batches if batches is not None else -(-len(items) // self.batch_size)
        for b in range(count):
            chunk = list(items[b * self.batch_size : (b + 1) * self.batch_size])
            filler = not chunk
            if filler:
                chunk = [items[0]] if items else []
            done = self._batch(chunk) if chunk else []
            if not filler:
                out += done
            if progress:
                progress("generating", min(len(out), len(items)), len(items))
        return out

    @torch.no_grad()
    def _batch(self, chunk: list[Item]) -> list[Completion]:
        from surgeon.data.encoding import _open_image

        prompts: list[str | None] = []
        images: list[list] = []
        errors: list[str | None] = []
        for item in chunk:
            try:
                opened = [_open_image(part) for part in item.images]
                if opened and not self.encoder.has_images:
                    raise BadSample("images for a text-only model", f"{len(opened)} image(s)")
                prompts.append(self.encoder.prompt(item.prompt))
                images.append(opened)
                errors.append(None)
            except BadSample as bad:
                prompts.append(None)
                images.append([])
                errors.append(str(bad))
        asked = [i for i, p in enumerate(prompts) if p is not None]
        texts = self._generate([prompts[i] for i in asked], [img for i in asked for img in images[i]]) if asked else []
        answers = dict(zip(asked, texts))
        return [Completion(prompts[i] or "", answers.get(i, ""), errors[i]) for i in range(len(chunk))]

    def _generate(self, prompts: list[str], images: list) -> list[str]:
        tokenizer = self.encoder.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            bos = getattr(tokenizer, "bos_token", None)
            special = not (bos and all(p.startswith(bos) for p in prompts))
            if self.encoder.has_images:
                inputs = self.encoder.processor(text=prompts, images=images or None, padding=True, return_tensors="pt", add_special_tokens=special)
            else:
                inputs = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=special)
        finally:
            tokenizer.padding_side = side
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        extra = {"synced_gpus": True} if self.synced else {}
        ids = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, eos_token_id=self.stops or None,
            pad_token_id=self.pad, **extra,
        )  # fmt: skip
        new = ids[:, inputs["input_ids"].shape[1] :].tolist()
        return [tokenizer.decode(_until(seq, self.stops), skip_special_tokens=True) for seq in new]


def _until(ids: list[int], stops: list[int]) -> list[int]:
    """The tokens before the first stop token."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids
