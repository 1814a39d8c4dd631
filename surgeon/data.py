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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
_TAGGED = re.compile(r"<perception>(.*?)</perception>", re.DOTALL)
_CONVERSATION_KEYS = ("messages", "conversations")
_IMAGE_KEYS = ("images", "image")
_SHOWN_LINES = 5
SKIP_HINT = "fix or remove the line, or skip bad lines (--skip-bad-lines)"


@dataclass(frozen=True)
class ImagePart:
    """An image inside a turn; ``path`` is resolved and exists."""

    path: Path


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
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def perception_text(self) -> list[str]:
        """The perception spans' text, in order (empty for a sample without any)."""
        return [t.text[a:b] for t in self.turns for a, b in t.perception]


@dataclass
class DataStats:
    """Counts filled in by ``load_samples`` and by encoding (``surgeon.encoding``).

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
    """Read a JSONL (or JSON array) chat dataset into normalised samples.

    Raises DataError for a file that cannot be read or holds no usable sample, and for the first
    bad line unless ``skip_bad``. ``max_samples`` stops after that many good samples. ``stats``,
    when given, receives the counts (``read``, ``skipped``).
    """
    file = Path(path)
    if not file.is_file():
        problem = "no such file" if not file.exists() else "is not a file"
        raise DataError(str(path), problem, "give the path of a .jsonl file")
    pattern = _compile(perception_regex)
    base = file.parent.resolve()
    stats = stats if stats is not None else DataStats()
    samples: list[Sample] = []
    for line, record in _records(file):
        if max_samples is not None and len(samples) >= max_samples:
            break
        stats.read += 1
        try:
            if isinstance(record, BadSample):
                raise record
            samples.append(parse_record(record, base, pattern, line, str(path)))
        except BadSample as bad:
            if not skip_bad:
                raise DataError(f"{path}:{line}", str(bad), SKIP_HINT) from None
            stats.skip(bad.reason, line)
    if not samples:
        detail = "holds no samples"
        if stats.read:
            detail = f"all {stats.read} samples are bad: {stats.describe_skipped()}"
        hint = "fix the lines named (`surgeon diagnose --help` describes the accepted formats)"
        raise DataError(str(path), detail, hint)
    return samples


def _compile(perception_regex: str | None) -> re.Pattern | None:
    if perception_regex is None:
        return None
    try:
        return re.compile(perception_regex)
    except re.error as exc:
        problem = f"{perception_regex!r} is not a valid regular expression ({exc})"
        raise ConfigError("perception_regex", problem) from None


MAX_LINE_BYTES = 8 * 2**20  # a JSONL line (one sample) longer than this is a bad line (surgeon's limit)
MAX_ARRAY_BYTES = 2**30  # a JSON-array file is parsed whole: larger ones must be JSONL


def _records(file: Path, max_line_bytes: int = MAX_LINE_BYTES):
    """Yield ``(line, record or BadSample)``, reading one line at a time (never more than
    ``max_line_bytes`` of one line: a longer line is a BadSample); a JSON array file is parsed
    whole and numbers its items from 1."""
    with open(file, "rb") as f:
        start = f.read(4096)
    head = start.decode("utf-8-sig", errors="ignore").lstrip()
    if head.startswith("["):
        size = file.stat().st_size
        if size > MAX_ARRAY_BYTES:
            raise DataError(str(file), f"is a {size / 2**30:.1f} GiB JSON array", "write it as JSONL, one sample a line")
        try:
            items = json.loads(file.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise DataError(str(file), "is not UTF-8 text", "give a .jsonl file with one JSON object a line") from None
        except json.JSONDecodeError as exc:
            where = f"{file}:{exc.lineno}"
            raise DataError(where, f"malformed JSON array ({exc.msg})", "fix the file") from None
        yield from enumerate(items, 1)
        return
    with open(file, "rb") as f:
        number = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):  # skip the rest of the line
                    size += len(more)
                size += len(more)
                limit = f"{max_line_bytes / 2**20:.0f} MB"
                yield number, BadSample("line too long", f"{size / 2**20:.1f} MB, over the limit of {limit} for one sample")
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark some editors write is not data
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(str(file), "is not UTF-8 text", "give a .jsonl file with one JSON object a line") from None
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, BadSample("malformed JSON", exc.msg)


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
            parts.append(ImagePart(_resolve(value, base)))
        turns.append(_assistant(parts, pattern, n) if role == "assistant" else Turn(role, tuple(parts)))
    if used != len(listed):
        detail = f"{used} image placeholder(s) but {len(listed)} image(s) listed"
        raise BadSample("image count mismatch", detail)
    if not any(t.role == "assistant" for t in turns):
        raise BadSample("no assistant turn", "the conversation has nothing to supervise")
    meta = {k: v for k, v in record.items() if k != key and k not in _IMAGE_KEYS}
    return Sample(tuple(turns), line, source, meta)


def _image_list(record: dict) -> list[str]:
    for key in _IMAGE_KEYS:
        value = record.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        # paths, or {"path": …} as a datasets Image column exports them
        paths = [x.get("path") if isinstance(x, dict) else x for x in items]
        if not all(isinstance(x, str) for x in paths):
            raise BadSample("unknown format", f"'{key}' must be a path or a list of paths")
        return paths
    return []


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


def _pieces(content: object, n: int) -> list[tuple[str, str | None]]:
    """``("text", str)`` and ``("image", inline path or None)`` pieces of one message's content;
    None means the image takes the next entry of the sample's ``images`` list."""
    if content is None:
        return []
    if isinstance(content, str):
        out: list[tuple[str, str | None]] = []
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
            inline = next((part[k] for k in ("image", "path", "url") if isinstance(part.get(k), str)), None)
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
    for m in _TAGGED.finditer(text):
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
