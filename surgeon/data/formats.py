"""The record formats users already have, read into ``Sample``s (``parse_record``).

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
from pathlib import Path

from surgeon.data.samples import (
    IMAGE_PLACEHOLDER,
    PERCEPTION_TAGS,
    ROLES,
    TAGGED,
    BadSample,
    ImagePart,
    Role,
    Sample,
    Turn,
)
from surgeon.errors import ConfigError

MAX_IMAGES = 256  # images in one sample (ours: far beyond any VLM's context, short of a line that names thousands)
_CONVERSATION_KEYS = ("messages", "conversations")
_IMAGE_KEYS = ("images", "image")

def compile_pattern(perception_regex: str | None) -> re.Pattern | None:
    if perception_regex is None:
        return None
    try:
        return re.compile(perception_regex)
    except re.error as exc:
        problem = f"{perception_regex!r} is not a valid regular expression ({exc})"
        raise ConfigError("perception_regex", problem) from None


def parse_record(
    record: object, base: Path, pattern: re.Pattern | None = None, line: int = 0, source: str = "", supervised: bool = True
) -> Sample:
    """One record (a parsed JSON object) -> Sample; raises BadSample explaining what is wrong.
    ``supervised=False`` (evaluation) also takes a conversation without an assistant turn."""
    if not isinstance(record, dict):
        raise BadSample("unknown format", f"expected a JSON object, got {type(record).__name__}")
    key = next((k for k in _CONVERSATION_KEYS if isinstance(record.get(k), list)), None)
    if key is None:
        keys = ", ".join(sorted(record)) or "none"
        raise BadSample("unknown format", f"no 'messages' or 'conversations' list (keys: {keys})")
    listed = _image_list(record)
    if len(listed) > MAX_IMAGES:
        raise BadSample("too many images", f"{len(listed)} images listed, more than surgeon's limit of {MAX_IMAGES} for one sample")
    queue = iter(listed)
    used = images = 0
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
            images += 1
            if images > MAX_IMAGES:
                raise BadSample("too many images", f"more than surgeon's limit of {MAX_IMAGES} images in one sample")
            parts.append(value if isinstance(value, ImagePart) else ImagePart(_resolve(value, base)))
        turns.append(_assistant(parts, pattern, n) if role == "assistant" else Turn(role, tuple(parts)))
    if used != len(listed):
        detail = f"{used} image placeholder(s) but {len(listed)} image(s) listed"
        raise BadSample("image count mismatch", detail)
    if supervised and not any(t.role == "assistant" for t in turns):
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
    from surgeon.io.paths import special_kind

    if special_kind(resolved):
        raise BadSample("unreadable image", f"{path} is {special_kind(resolved)}, not an image file")
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
