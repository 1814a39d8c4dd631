"""Chat datasets for VLM fine-tuning: read JSONL in the formats users already have.

    stats = DataStats()
    samples = load_samples("data.jsonl", stats=stats)             # list[Sample]
    samples[0].turns[-1].text, samples[0].turns[-1].perception    # assistant text, its perception spans

Accepted, one sample a line (a ``.json`` file holding one JSON array of samples works too):

- TRL: ``{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
  {"type": "text", "text": "…"}]}, {"role": "assistant", "content": …}]}``. An image part
  without a path takes the next entry of the sample's ``images`` list.
- ShareGPT / LLaVA: ``{"conversations": [{"from": "human", "value": "<image>…"},
  {"from": "gpt", "value": "…"}], "images": ["a.png"]}`` (or a single ``"image": "a.png"``).
- LLaMA-Factory: ``{"messages": [{"role": "user", "content": "<image>…"}, …], "images": […]}``.

Roles may be user/human, assistant/gpt/model, system. String content is split at ``<image>``
placeholders, which take the ``images`` list in order; their count must equal the list's length.
List entries are paths or ``{"path": …}`` objects. In a ``.json`` array the "line" of a sample is
its 1-based position in the array.
Image paths are resolved relative to the data file (absolute paths are kept). Samples without
images are text-only samples. Every other top-level key (``answer``, ``perception_reference``…) is
kept in ``Sample.meta``.

Perception spans. In assistant turns, ``<perception>…</perception>`` marks the perception part;
the tags are removed and the spans kept as character ranges of the cleaned text. With
``perception_regex`` instead, the text is left as written and every match of the regex is a
perception span (its group 1 when the regex has a group, else the whole match); tags are then not
interpreted. Everything else the assistant writes is the reasoning span.

Bad lines. A line that cannot be used (malformed JSON, unknown format, no assistant turn, missing
image file, ``<image>`` count different from the image count, unbalanced tags) stops loading
with a one-line DataError naming ``file:line`` (surgeon default, so that nothing is dropped
silently). With ``skip_bad=True`` such lines are skipped instead and counted, by reason with their
first line numbers, in ``DataStats``.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from surgeon.errors import ConfigError, DataError

Role = Literal["system", "user", "assistant"]
ROLES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}
IMAGE_PLACEHOLDER = "<image>"
PERCEPTION_TAGS = ("<perception>", "</perception>")
TAGGED = re.compile(r"<perception>(.*?)</perception>", re.DOTALL)  # a perception span in an answer
_CONVERSATION_KEYS = ("messages", "conversations")
_IMAGE_KEYS = ("images", "image")
_SHOWN_LINES = 5
SKIP_HINT = "fix or remove the line, or skip bad lines (--skip-bad-lines)"


@dataclass(frozen=True)
class ImagePart:
    """An image inside a turn: a resolved, existing ``path``, or the image file's bytes (``data``,
    from a dataset's image column; ``path`` is then its name, if any)."""

    path: Path
    data: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Turn:
    """One message. ``parts`` are text (str) and images, in order.

    Assistant turns hold text only; ``perception`` are ``(start, end)`` character ranges of
    ``text`` (tags already removed), sorted and disjoint.
    """

    role: Role
    parts: tuple[str | ImagePart, ...]
    perception: tuple[tuple[int, int], ...] = ()

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[Path]:
        return [p.path for p in self.parts if isinstance(p, ImagePart)]


@dataclass(frozen=True)
class Sample:
    """One conversation in normalised form. ``source`` is the data file as given; ``line`` is
    1-based (the array index + 1 for a .json array); ``where`` is ``"source:line"``."""

    turns: tuple[Turn, ...]
    line: int
    source: str
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def images(self) -> list[Path]:
        return [path for turn in self.turns for path in turn.images]

    @property
    def image_parts(self) -> list[ImagePart]:
        return [p for turn in self.turns for p in turn.parts if isinstance(p, ImagePart)]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def perception_text(self) -> list[str]:
        """The perception spans' text, in order (empty for a sample without any)."""
        return [t.text[a:b] for t in self.turns for a, b in t.perception]


@dataclass
class DataStats:
    """Counts filled in by ``load_samples`` and by encoding (``surgeon.data.encoding``).

    ``skipped`` maps a reason to its count; ``skipped_lines`` to its first few line numbers.
    Token counts cover the samples that were encoded and kept.
    """

    read: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_lines: dict[str, list[int]] = field(default_factory=dict)
    images: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    perception_tokens: int = 0

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.skipped_lines.setdefault(reason, [])
        if len(shown) < _SHOWN_LINES:
            shown.append(line)

    def describe_skipped(self) -> str:
        """``"2 missing image file (lines 3, 9); 1 …"`` or ``"none"``."""
        if not self.skipped:
            return "none"
        parts = []
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            lines = ", ".join(map(str, self.skipped_lines[reason])) + (", …" if n > _SHOWN_LINES else "")
            parts.append(f"{n} {reason} (line{'s' if n > 1 else ''} {lines})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "used": self.used,
            "skipped": dict(self.skipped),
            "skipped_lines": {k: list(v) for k, v in self.skipped_lines.items()},
            "images": self.images,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
            "perception_tokens": self.perception_tokens,
        }


class BadSample(Exception):
    """Raised while parsing one record; ``reason`` is a short category, ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def load_samples(
    path: str | Path,
    perception_regex: str | None = None,
    skip_bad: bool = False,
    max_samples: int | None = None,
    stats: DataStats | None = None,
) -> list[Sample]:
    """Read a chat dataset (any source ``surgeon.data.rows.open_rows`` reads) into normalised samples.

    Raises DataError for a source that cannot be read or holds no usable sample, and for the first
    bad line unless ``skip_bad``. ``max_samples`` stops after that many good samples. ``stats``,
    when given, receives the counts (``read``, ``skipped``). For large datasets prefer
    ``scan_samples``, which keeps row numbers instead of samples.
    """
    scanned = scan_samples(path, perception_regex, skip_bad, max_samples, stats)
    return [scanned.sample(i) for i in range(len(scanned))]


@dataclass
class ScannedData:
    """The usable rows of a data source, found by ``scan_samples`` without reading any pixel.

    ``rows``: the source (``surgeon.data.rows``); ``good``: indices of its usable rows; ``sample(i)``
    parses the i-th usable row again (memory stays one sample whatever the dataset's size).
    ``perception``: whether any assistant turn marks a perception span; ``with_images``: the
    positions (into the usable rows) of samples with images."""

    rows: Any
    good: Any  # array("q") of row indices
    stats: DataStats
    pattern: re.Pattern | None
    perception: bool = False
    with_images: Any = field(default_factory=lambda: array("q"))

    @property
    def images(self) -> int:
        return len(self.with_images)

    def __len__(self) -> int:
        return len(self.good)

    def sample(self, i: int) -> Sample:
        j = self.good[i]
        return parse_record(self.rows.record(j), self.rows.base, self.pattern, self.rows.line(j), self.rows.source)

    def samples(self, order: Sequence[int] | None = None) -> SampleView:
        """The usable samples (or those at ``order``) as a sequence parsed on access."""
        return SampleView(self, range(len(self)) if order is None else order)


class SampleView(Sequence):
    """Samples of a ``ScannedData``, parsed when indexed: a dataset-sized list of samples never exists."""

    def __init__(self, scanned: ScannedData, order: Sequence[int]) -> None:
        self.scanned, self.order = scanned, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        return self.scanned.sample(self.order[i])


def scan_samples(
    path: str | Path,
    perception_regex: str | None = None,
    skip_bad: bool = False,
    max_samples: int | None = None,
    stats: DataStats | None = None,
) -> ScannedData:
    """One validation pass over a data source: every row is parsed and checked (format, roles,
    image files exist, image counts, perception tags) but no image is opened. Raises DataError at
    the first bad row, naming its line, unless ``skip_bad`` (then it is counted in ``stats``)."""
    from surgeon.data.rows import MalformedLine, TooLongLine, open_rows

    rows = open_rows(path)
    pattern = _compile(perception_regex)
    stats = stats if stats is not None else DataStats()
    scanned = ScannedData(rows, array("q"), stats, pattern)
    for j in range(len(rows)):
        if max_samples is not None and len(scanned.good) >= max_samples:
            break
        stats.read += 1
        line = rows.line(j)
        try:
            try:
                record = rows.record(j)
            except TooLongLine as exc:
                raise BadSample("line too long", str(exc)) from None
            except MalformedLine as exc:
                raise BadSample("malformed JSON", str(exc)) from None
            sample = parse_record(record, rows.base, pattern, line, rows.source)
        except BadSample as bad:
            if not skip_bad:
                raise DataError(f"{rows.source}:{line}", str(bad), SKIP_HINT) from None
            stats.skip(bad.reason, line)
            continue
        if sample.images:
            scanned.with_images.append(len(scanned.good))
        scanned.good.append(j)
        scanned.perception = scanned.perception or any(t.perception for t in sample.turns)
    if not scanned.good:
        detail = "holds no samples"
        if stats.read:
            detail = f"all {stats.read} samples are bad: {stats.describe_skipped()}"
        hint = "fix the lines named (`surgeon diagnose --help` describes the accepted formats)"
        raise DataError(str(path), detail, hint)
    return scanned


def _compile(perception_regex: str | None) -> re.Pattern | None:
    if perception_regex is None:
        return None
    try:
        return re.compile(perception_regex)
    except re.error as exc:
        problem = f"{perception_regex!r} is not a valid regular expression ({exc})"
        raise ConfigError("perception_regex", problem) from None


def parse_record(
    record: object, base: Path, pattern: re.Pattern | None = None, line: int = 0, source: str = ""
) -> Sample:
    """One record (a parsed JSON object) -> Sample; raises BadSample explaining what is wrong."""
    if not isinstance(record, dict):
        raise BadSample("unknown format", f"expected a JSON object, got {type(record).__name__}")
    key = next((k for k in _CONVERSATION_KEYS if isinstance(record.get(k), list)), None)
    if key is None:
        keys = ", ".join(sorted(record)) or "none"
        raise BadSample("unknown format", f"no 'messages' or 'conversations' list (keys: {keys})")
    listed = _image_list(record)
    queue = iter(listed)
    used = 0
    turns: list[Turn] = []
    for n, message in enumerate(record[key], 1):
        role, content = _role_and_content(message, n)
        parts: list[str | ImagePart] = []
        for kind, value in _pieces(content, n):
            if kind == "text":
                if value:
                    parts.append(value)
                continue
            if value is None:  # an image that takes the next entry of the images list
                used += 1
                value = next(queue, None)
                if value is None:
                    continue  # reported below with the totals
            parts.append(value if isinstance(value, ImagePart) else ImagePart(_resolve(value, base)))
        turns.append(_assistant(parts, pattern, n) if role == "assistant" else Turn(role, tuple(parts)))
    if used != len(listed):
        detail = f"{used} image placeholder(s) but {len(listed)} image(s) listed"
        raise BadSample("image count mismatch", detail)
    if not any(t.role == "assistant" for t in turns):
        raise BadSample("no assistant turn", "the conversation has nothing to supervise")
    meta = {k: v for k, v in record.items() if k != key and k not in _IMAGE_KEYS}
    return Sample(tuple(turns), line, source, meta)


def _image_list(record: dict) -> list[str | ImagePart]:
    """The sample's listed images: paths, or ``{"bytes": …, "path": …}`` as a ``datasets`` Image
    column holds them (the bytes win; the path alone is resolved like a path)."""
    for key in _IMAGE_KEYS:
        value = record.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        out: list[str | ImagePart] = []
        for x in items:
            image = _image_value(x)
            if image is None:
                raise BadSample("unknown format", f"'{key}' must hold image paths or images")
            out.append(image)
        return out
    return []


def _image_value(x: object) -> str | ImagePart | None:
    """A path, or the image itself: ``{"bytes": …, "path": …}`` as a ``datasets`` Image column holds
    it undecoded (the bytes win), or a decoded PIL image; None for anything else."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        if isinstance(x.get("bytes"), (bytes, bytearray)) and x["bytes"]:
            return ImagePart(Path(str(x.get("path") or "image")), bytes(x["bytes"]))
        return x["path"] if isinstance(x.get("path"), str) else None
    if hasattr(x, "save") and hasattr(x, "size") and hasattr(x, "mode"):  # a PIL image
        import io

        buffer = io.BytesIO()
        x.save(buffer, format="PNG")  # type: ignore[attr-defined]
        return ImagePart(Path("image.png"), buffer.getvalue())
    return None


def _role_and_content(message: object, n: int) -> tuple[Role, object]:
    if not isinstance(message, dict):
        raise BadSample("unknown format", f"message {n} is not an object")
    raw_role = message.get("role", message.get("from"))
    if "content" in message:
        content = message["content"]
    elif "value" in message:
        content = message["value"]
    else:
        raise BadSample("unknown format", f"message {n} has no 'content' or 'value'")
    role = ROLES.get(str(raw_role).lower()) if raw_role is not None else None
    if role is None:
        detail = f"message {n} has role {raw_role!r}; expected user/assistant/system or human/gpt"
        raise BadSample("unknown role", detail)
    return role, content


def _pieces(content: object, n: int) -> list[tuple[str, str | ImagePart | None]]:
    """``("text", str)`` and ``("image", inline path or None)`` pieces of one message's content;
    None means the image takes the next entry of the sample's ``images`` list."""
    if content is None:
        return []
    if isinstance(content, str):
        out: list[tuple[str, str | ImagePart | None]] = []
        for k, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if k:
                out.append(("image", None))
            out.append(("text", text))
        return out
    if not isinstance(content, list):
        raise BadSample("unknown format", f"message {n} content must be a string or a list of parts")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(("text", str(part.get("text") or "")))
        elif kind == "image":
            inline = next((_image_value(part[k]) for k in ("image", "path", "url") if part.get(k) is not None), None)
            out.append(("image", inline))
        elif kind == "video":
            detail = f"message {n} has a video; surgeon trains on images and text"
            raise BadSample("unsupported content", detail)
        else:
            detail = f"message {n} has a content part of type {kind!r}; expected text or image"
            raise BadSample("unknown format", detail)
    return out


def _resolve(path: str, base: Path) -> Path:
    if "://" in path:
        detail = f"{path} is a URL; download the images and use paths relative to the data file"
        raise BadSample("remote image", detail)
    resolved = (base / path) if not Path(path).is_absolute() else Path(path)
    if not resolved.is_file():
        raise BadSample("missing image file", f"{path} (looked for {resolved})")
    return resolved


def _assistant(parts: list[str | ImagePart], pattern: re.Pattern | None, n: int) -> Turn:
    if any(isinstance(p, ImagePart) for p in parts):
        raise BadSample("unsupported content", f"message {n}: images in assistant turns are not supported")
    text = "".join(p for p in parts if isinstance(p, str))
    text, spans = perception_spans(text, pattern, n)
    return Turn("assistant", (text,) if text else (), spans)


def perception_spans(
    text: str, pattern: re.Pattern | None = None, n: int = 0
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """``(cleaned text, perception character spans)`` of one assistant text.

    Tags: ``"<perception>A</perception> B"`` -> ``("A B", ((0, 1),))``. Regex: the text unchanged
    and one span per non-empty match (group 1 if the pattern has groups).
    """
    if pattern is not None:
        group = 1 if pattern.groups else 0
        spans = tuple(m.span(group) for m in pattern.finditer(text) if m.group(group))
        return text, spans
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    size = last = 0
    for m in TAGGED.finditer(text):
        before, inside = text[last : m.start()], m.group(1)
        if any(tag in before or tag in inside for tag in PERCEPTION_TAGS):
            raise BadSample("unbalanced perception tags", f"message {n}: a tag without a partner")
        out += [before, inside]
        size += len(before)
        if inside:
            spans.append((size, size + len(inside)))
        size += len(inside)
        last = m.end()
    tail = text[last:]
    if any(tag in tail for tag in PERCEPTION_TAGS):
        raise BadSample("unbalanced perception tags", f"message {n}: a tag without a partner")
    return "".join(out) + tail, tuple(spans)
