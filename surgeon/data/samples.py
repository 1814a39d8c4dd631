"""Samples: one conversation of a chat dataset, normalised whatever format it came in.

    sample.turns[-1].text, sample.turns[-1].perception    # assistant text, its perception spans
    sample.images                                          # image parts in order (paths or bytes)

``surgeon.data.formats`` reads records into samples; ``surgeon.data.scan`` reads whole data sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
