"""Samples -> model inputs, with the model's own processor and chat template; batches for ``model(**batch)``.

    encoder = SampleEncoder.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", max_length=4096)
    batch = encoder.collate([encoder.encode(sample) for sample in samples])
    perception = batch.pop("perception_mask")          # bool [B, T]
    out = model(**batch)                               # labels [B, T], -100 where not supervised

How tokens are found. The conversation is rendered to text with the chat template; each assistant
turn's text is located in that rendering (searched from the end of the rendered generation
prompt of the turns before it), together with the end-of-turn marker the template writes after it
(e.g. ``<|im_end|>``; trailing whitespace after it is not supervised). A template that writes
nothing there gets the tokenizer's EOS token appended to each assistant turn, so that the model
learns to stop (surgeon default). The rendering is tokenised by the processor, which expands each
image placeholder into the image's patch tokens; the fast tokenizer's offsets, shifted by the
processor's reported expansions, give each token's characters. A token is supervised when its characters overlap an assistant span, and a perception
token when they overlap a perception span (spans trimmed of surrounding whitespace). Image, video
and padding positions are never supervised; the perception mask is a subset of the supervised
tokens. Rendering as inference does means training sees exactly the tokens the model sees when
it is used.

Truncation (``max_length``) keeps the first ``max_length`` tokens; a sample whose image or video
placeholders reach past that point raises ``TooLong``, as does one left with no supervised token
(``surgeon.data.loading`` counts such samples as skipped). Datasets for a DataLoader are in
``surgeon.data.loading``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgeon.data.samples import BadSample, ImagePart, Sample
from surgeon.data.templates import TemplateTooCostly, bounded, install
from surgeon.errors import DataError

IGNORE_INDEX = -100
TOKEN_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "perception_mask",
    "mm_token_type_ids",
    "token_type_ids",
)
VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "image_sizes",
)
_PAD_VALUES = {"labels": IGNORE_INDEX, "perception_mask": False}
_PROBE = "SURGEONPROBE"
RENDER_FACTOR = 4  # a chat template may write this many times the conversation's text (plus a fixed allowance)
CHARS_PER_TOKEN = 16  # a first guess at the characters that ``max_length`` tokens take (grown until enough)
_SPARE_TOKENS = 64  # tokens past ``max_length`` that a shortened text must still give
Progress = Callable[[str, int, int], None]


class TooLong(BadSample):
    """A sample that does not fit ``max_length``: always skipped and counted, never an error."""


@dataclass
class Encoded:
    """One encoded sample.

    ``tokens``: 1-D tensors of length T (``input_ids``, ``attention_mask``, ``labels``,
    ``perception_mask`` and the processor's other per-token inputs, e.g. ``mm_token_type_ids``).
    ``vision``: the processor's image tensors for this sample (e.g. Qwen-VL ``pixel_values``
    [patches, C·t·p·p] and ``image_grid_thw`` [images, 3]; LLaVA ``pixel_values`` [images, 3, H, W]),
    empty for a text-only sample. ``line`` is the sample's line in the data file.
    """

    tokens: dict[str, torch.Tensor]
    vision: dict[str, torch.Tensor]
    line: int
    skipped: str | None = None  # why a hollow stand-in replaces the sample (``LazyDataset``)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens["input_ids"]

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens["labels"]

    @property
    def perception_mask(self) -> torch.Tensor:
        return self.tokens["perception_mask"]

    def __len__(self) -> int:
        return int(self.tokens["input_ids"].shape[0])


class SampleEncoder:
    """Encodes Samples with a model's processor (a VLM's AutoProcessor, or a text LLM's tokenizer).

    ``placeholder_ids``: extra token ids never to supervise (the model config's image/video ids;
    the processor's own are always added). ``max_length``: None keeps every token.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        placeholder_ids: Iterable[int] = (),
        name: str = "model",
    ) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.name = name
        self.max_length = max_length
        self.has_images = hasattr(processor, "image_processor")
        if not getattr(self.tokenizer, "is_fast", True):
            hint = "install `tokenizers` and use a model with tokenizer.json"
            raise DataError(name, "has no fast tokenizer (character offsets are needed)", hint)
        ids = set(placeholder_ids)
        for attr in ("image_token_id", "video_token_id"):
            if isinstance(getattr(processor, attr, None), int):
                ids.add(getattr(processor, attr))
        for token in getattr(processor, "all_special_multimodal_tokens", None) or []:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                ids.add(tid)
        self.placeholder_ids = frozenset(ids)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        owner = processor if getattr(processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            hint = "use a chat/instruct model folder (with chat_template.jinja or tokenizer_config.json)"
            raise DataError(name, "has no chat template", hint)
        self._template = owner
        templates = owner.chat_template if isinstance(owner.chat_template, dict) else {"default": owner.chat_template}
        for template in templates.values():
            install(template if isinstance(template, str) else None)
        try:
            probe = self._render([self._message("user", ["Hi"]), self._message("assistant", [_PROBE])])
        except BadSample as bad:
            problem = f"its chat template cannot render a user/assistant exchange ({bad.detail})"
            raise DataError(name, problem) from None
        if _PROBE not in probe:
            hint = "use a chat template that renders assistant turns"
            raise DataError(name, "its chat template drops the assistant's text", hint)
        self.turn_suffix = probe[probe.rindex(_PROBE) + len(_PROBE) :].rstrip()
        # a template that writes nothing after an assistant turn: end each one with EOS instead
        self.appended_eos = "" if self.turn_suffix else (getattr(self.tokenizer, "eos_token", None) or "")

    @classmethod
    def from_pretrained(
        cls, model: str | Path, max_length: int | None = None, name: str | None = None
    ) -> SampleEncoder:
        """Load the processor (or tokenizer) and placeholder ids of a model folder (or a Hub repo id,
        through transformers' own download); ``name`` is how messages refer to the model."""
        from transformers import AutoConfig, AutoProcessor

        from surgeon.anatomy.layout import placeholder_token_ids

        try:
            processor = AutoProcessor.from_pretrained(str(model))
            config = AutoConfig.from_pretrained(str(model)).to_dict()
        except (OSError, ValueError) as exc:
            problem = f"cannot load its processor ({' '.join(str(exc).split())[:200]})"
            hint = "give a model folder with its tokenizer/processor files"
            raise DataError(str(model), problem, hint) from None
        return cls(processor, max_length, placeholder_token_ids(config).values(), name=name or str(model))

    # ------------------------------------------------------------------ rendering

    def _message(self, role: str, parts: Sequence[object]) -> dict:
        if not self.has_images:
            return {"role": role, "content": "".join(p for p in parts if isinstance(p, str))}
        content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
        return {"role": role, "content": content}

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the chat template writes it, at most ``RENDER_FACTOR`` times its own
        text (and at least ``templates.MIN_CHARS``) within ``templates.MAX_SECONDS``."""
        from jinja2.exceptions import TemplateError

        size = sum(len(p.get("text", "")) if isinstance(p, dict) else len(p) for m in messages for p in _parts(m["content"]))
        try:
            with bounded(chars=RENDER_FACTOR * size):
                text = self._template.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise BadSample("chat template refuses the conversation", " ".join(str(exc).split())) from None
        except TemplateTooCostly as exc:
            raise BadSample("chat template too costly", str(exc)) from None
        return text if isinstance(text, str) else text[0]

    def prompt(self, turns: Sequence[Any]) -> str:
        """The text the model continues from: ``turns`` (``surgeon.data.samples.Turn``) rendered with
        the chat template's generation prompt (what inference sends)."""
        try:
            return self._render([self._message(t.role, t.parts) for t in turns], add_generation_prompt=True)
        except BadSample as bad:
            raise DataError(self.name, f"its chat template cannot render a prompt ({bad.detail})") from None

    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generated answer: EOS, and the end-of-turn marker the template writes."""
        ids = {self.tokenizer.eos_token_id} if isinstance(self.tokenizer.eos_token_id, int) else set()
        if self.turn_suffix:
            suffix = self.tokenizer(self.turn_suffix, add_special_tokens=False)["input_ids"]
            if len(suffix) == 1:
                ids.add(suffix[0])
        return sorted(ids)

    def render(self, sample: Sample) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """``(text, supervised spans, perception spans)``: character ranges in the rendered text."""
        messages = [self._message(t.role, t.parts) for t in sample.turns]
        full = self._render(messages)
        supervised: list[tuple[int, int]] = []
        perception: list[tuple[int, int]] = []
        cursor = 0
        for i, turn in enumerate(sample.turns):
            if turn.role != "assistant":
                continue
            start = cursor
            if i:
                prompt = self._render(messages[:i], add_generation_prompt=True)
                if full.startswith(prompt):
                    start = max(start, len(prompt))
            text = turn.text
            core, lead = text.strip(), len(text) - len(text.lstrip())
            pos = full.find(core, start)
            if pos < 0:
                detail = f"message {i + 1} is not in the rendered conversation"
                raise BadSample("chat template changes the assistant text", detail)
            for a, b in turn.perception:
                a, b = max(a - lead, 0), min(b - lead, len(core))
                seg = core[a:b]
                a, b = a + len(seg) - len(seg.lstrip()), b - (len(seg) - len(seg.rstrip()))
                if b > a:
                    perception.append((pos + a, pos + b))
            end = pos + len(core)
            if self.turn_suffix and full.startswith(self.turn_suffix, end):
                end += len(self.turn_suffix)
            supervised.append((pos, end))
            cursor = end
        if self.appended_eos:
            return _insert_after(full, supervised, perception, self.appended_eos)
        return full, supervised, perception

    # ------------------------------------------------------------------ encoding

    def encode(self, sample: Sample) -> Encoded:
        """Encode one sample. Raises TooLong (skip and count) or BadSample (a bad line)."""
        if sample.images and not self.has_images:
            detail = f"the sample has {len(sample.images)} image(s) but {self.name} has no image processor"
            raise BadSample("images for a text-only model", detail)
        text, supervised, perception = self.render(sample)
        images = [_open_image(p) for p in sample.image_parts] if self.has_images else []
        # only as much text as max_length tokens need: memory follows the tokens kept, not the line
        cut = len(text) if self.max_length is None else CHARS_PER_TOKEN * (self.max_length + _SPARE_TOKENS)
        cut += _last_placeholder_end(text, self._placeholder_texts)
        while True:
            out, replacements = self._tokenize(text if cut >= len(text) else text[: _whitespace_before(text, cut)], images)
            if cut >= len(text) or out["input_ids"].shape[1] > self.max_length + _SPARE_TOKENS:  # type: ignore[operator]
                break
            cut *= 2
        ids = out["input_ids"][0]
        offsets = out["offset_mapping"][0]
        shift = _expansion(replacements)
        sup = _covered(offsets, [(shift(a), shift(b)) for a, b in supervised])
        per = _covered(offsets, [(shift(a), shift(b)) for a, b in perception])
        placeholder = torch.isin(ids, torch.tensor(sorted(self.placeholder_ids), dtype=ids.dtype))
        labels = torch.where(sup & ~placeholder, ids, torch.full_like(ids, IGNORE_INDEX))
        tokens = {"input_ids": ids, "labels": labels, "perception_mask": per & (labels != IGNORE_INDEX)}
        vision = {}
        for key, value in out.items():
            if key in ("input_ids", "offset_mapping") or not isinstance(value, torch.Tensor):
                continue
            if key in TOKEN_KEYS or (key not in VISION_KEYS and tuple(value.shape) == (1, len(ids))):
                tokens[key] = value[0]
            else:
                vision[key] = value
        tokens.setdefault("attention_mask", torch.ones_like(ids))
        if self.max_length is not None and len(ids) > self.max_length:
            if placeholder[self.max_length :].any():
                raise TooLong("image placeholders beyond max_length")
            tokens = {k: v[: self.max_length] for k, v in tokens.items()}
            if not (tokens["labels"] != IGNORE_INDEX).any():
                raise TooLong("no supervised tokens within max_length")
        return Encoded(tokens, vision, sample.line)

    def _tokenize(self, text: str, images: list[Any]) -> tuple[Any, list[dict]]:
        """(the processor's output for ``text`` with ``images``, with offsets; its placeholder expansions)."""
        kwargs: dict[str, Any] = {"return_offsets_mapping": True, "return_tensors": "pt"}
        if not self.has_images:
            return self.tokenizer(text, add_special_tokens=False, **kwargs), []
        bos = getattr(self.tokenizer, "bos_token", None)
        try:
            out = self.processor(
                text=[text], images=images or None, return_text_replacement_offsets=True,
                add_special_tokens=not (bos and text.startswith(bos)), **kwargs,
            )  # fmt: skip
        except ValueError as exc:  # e.g. a literal placeholder token written in the text
            raise BadSample("processor refuses the sample", " ".join(str(exc).split())) from None
        if images and "text_replacement_offsets" not in out:
            problem = "its processor does not report where it expands image placeholders"
            raise DataError(self.name, problem, "update transformers (surgeon needs >= 5.0 processors)")
        return out, (out.get("text_replacement_offsets") or [[]])[0]

    @property
    def _placeholder_texts(self) -> list[str]:
        """The strings of the processor's image/video placeholder tokens, as they stand in rendered text."""
        names = [getattr(self.processor, a, None) for a in ("image_token", "video_token")]
        names += [self.tokenizer.convert_ids_to_tokens(i) for i in self.placeholder_ids]
        return sorted({n for n in names if isinstance(n, str) and n}, key=len, reverse=True)

    def collate(self, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """``collate(items, self.pad_token_id)``, for ``DataLoader(collate_fn=encoder.collate)``."""
        return collate(items, self.pad_token_id)


def collate(items: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch for ``model(**batch)`` plus ``perception_mask`` (pop it before calling the model).

    Per-token keys are right-padded to the longest sample: ``input_ids`` with ``pad_token_id``,
    ``labels`` with -100, ``perception_mask`` with False, the rest (``attention_mask``,
    ``mm_token_type_ids``) with 0. Vision tensors are concatenated along dim 0 in sample order
    (Qwen-VL's flattened patches and grids, LLaVA's images); a batch without images has none.
    """
    if not items:
        raise ValueError("collate needs at least one sample")
    width = max(len(e) for e in items)
    batch: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for e in items for k in e.tokens):
        pad = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
        dtype = next(e.tokens[key].dtype for e in items if key in e.tokens)
        out = torch.full((len(items), width), pad, dtype=dtype)
        for i, e in enumerate(items):
            if key in e.tokens:
                out[i, : len(e)] = e.tokens[key]
        batch[key] = out
    batch.update(concat_vision(items))
    return batch


def concat_vision(items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    """The samples' vision tensors concatenated along dim 0 in sample order (Qwen-VL's flattened
    patches and grids, LLaVA's images); none for samples without images."""
    batch: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for e in items for k in e.vision):
        parts = [e.vision[key] for e in items if key in e.vision]
        if len({tuple(p.shape[1:]) for p in parts}) > 1:
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            problem = f"cannot concatenate {key} of shapes {shapes}"
            raise DataError("batch", problem, "use batch size 1 for this model")
        batch[key] = torch.cat(parts, dim=0)
    return batch


def _parts(content: object) -> list[Any]:
    return content if isinstance(content, list) else [content] if isinstance(content, str) else []


def _last_placeholder_end(text: str, placeholders: list[str]) -> int:
    """Where the last image/video placeholder of ``text`` ends (0 without one)."""
    return max((text.rfind(p) + len(p) for p in placeholders if p in text), default=0)


def _whitespace_before(text: str, cut: int) -> int:
    """``cut`` moved back to just after a whitespace (so that no word is split), if there is one
    within 1,024 characters."""
    for ws in (" ", "\n"):
        at = text.rfind(ws, max(cut - 1024, 0), cut)
        if at > 0:
            return at + 1
    return cut


def _insert_after(
    text: str, spans: list[tuple[int, int]], inner: list[tuple[int, int]], insert: str
) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """Insert ``insert`` at the end of each of ``spans`` (sorted, disjoint), extending them;
    ``inner`` spans (each inside one of ``spans``) move with their text."""
    pieces, last, n = [], 0, len(insert)
    for _, end in spans:
        pieces += [text[last:end], insert]
        last = end
    pieces.append(text[last:])
    moved = [(a + n * k, b + n * (k + 1)) for k, (a, b) in enumerate(spans)]
    before = [n * sum(end <= a for _, end in spans) for a, _ in inner]
    return "".join(pieces), moved, [(a + d, b + d) for (a, b), d in zip(inner, before)]


MAX_IMAGE_PIXELS = 8192 * 8192  # one image (ours): checked from its header before any pixel is decoded


def _open_image(part: ImagePart) -> Any:
    """The image of a part (a file, or the bytes a dataset carries), as RGB; refused before decoding
    when it has more than ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb decodes to gigabytes)."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(part.data) if part.data is not None else part.path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise BadSample("image too large", f"{part.path.name} is {width}×{height} pixels, over surgeon's limit of 8192×8192")
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("image too large", f"{part.path.name}: {' '.join(str(exc).split())[:160]}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise BadSample("unreadable image", f"{part.path.name}: {' '.join(str(exc).split())}") from None


def _expansion(replacements: list[dict]) -> Callable[[int], int]:
    """Map a character position of the rendered text to the processor's expanded text."""
    moves = []
    for r in replacements:
        (start, end), (new_start, new_end) = r["span"], r["new_span"]
        moves.append((end, (new_end - new_start) - (end - start)))

    def shift(pos: int) -> int:
        return pos + sum(delta for end, delta in moves if pos >= end)

    return shift


def _covered(offsets: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """bool [T]: tokens whose ``[start, end)`` characters overlap one of ``spans``."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = torch.zeros(len(offsets), dtype=torch.bool)
    for a, b in spans:
        mask |= (starts < b) & (ends > a) & (ends > starts)
    return mask

