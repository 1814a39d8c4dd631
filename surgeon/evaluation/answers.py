"""The answer in a text, found the same way in references and generations, and compared normalised.

    extract("so the total is 12. Answer: 12")          # "12"
    extract(r"… \\boxed{3/4}")                          # "3/4"
    same("12.0", "12"), same("1,000", "1000")           # True, True

Rules, first match wins (the last occurrence of it in the text): ``<answer>X</answer>``,
``\\boxed{X}``, ``Answer: X`` / ``Final answer: X``, ``The answer is X``; else the last number in
the text; else the whole text. ``--answer-regex`` replaces the rules (its group 1, else the whole
match). Numbers compare by value (``1,000`` = ``1000.0``; fractions ``3/4`` = ``0.75``); other
answers compare case-folded, with surrounding punctuation, articles and extra spaces removed.
"""

from __future__ import annotations

import re
from fractions import Fraction

_RULES = (
    re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S | re.I),
    re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}"),
    re.compile(r"(?:final\s+)?answer\s*[:：]\s*([^\n]*)", re.I),
    re.compile(r"the\s+(?:final\s+)?answer\s+is\s*[:：]?\s*([^\n]*)", re.I),
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_ARTICLES = re.compile(r"^(?:the|a|an)\s+", re.I)
_EDGES = " \t\n.,;:!?\"'`*()[]{}$"
_SENTENCE_END = re.compile(r"[.;!?](?=\s|$)")


def extract(text: str, pattern: re.Pattern | None = None) -> str | None:
    """The answer ``text`` gives (see the module docstring), or None for an empty text."""
    if not text or not text.strip():
        return None
    if pattern is not None:
        found = list(pattern.finditer(text))
        if not found:
            return None
        last = found[-1]
        return (last.group(1) if pattern.groups else last.group(0)).strip()
    for k, rule in enumerate(_RULES):
        found = rule.findall(text)
        if found and found[-1].strip():
            answer = found[-1].strip()
            if k >= 2:  # "Answer: 42. Let me check." -> "42" (a sentence's end, not a decimal point)
                answer = _SENTENCE_END.split(answer)[0]
            return answer.strip(_EDGES) or answer
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else text.strip()


def normalise(answer: str | None) -> str | Fraction | None:
    """A number as an exact Fraction, anything else as folded text; None stays None."""
    if answer is None:
        return None
    text = answer.strip().strip(_EDGES)
    value = _as_number(text)
    if value is not None:
        return value
    numbers = _NUMBER.findall(text)
    if len(numbers) == 1 and len(text) - len(numbers[0]) <= 12:  # "12 apples", "$1,000"
        value = _as_number(numbers[0])
        if value is not None:
            return value
    return " ".join(_ARTICLES.sub("", text.casefold()).split())


def same(a: str | None, b: str | None) -> bool:
    """Whether two answers are the same after ``normalise`` (None never matches)."""
    x, y = normalise(a), normalise(b)
    return x is not None and y is not None and x == y


def _as_number(text: str) -> Fraction | None:
    text = text.replace(",", "").replace(" ", "")
    try:
        if "/" in text:
            num, _, den = text.partition("/")
            return Fraction(Fraction(num), Fraction(den))
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def contains(generated: str, span: str) -> bool:
    """Whether ``generated`` says ``span`` (a reference perception span), compared case-folded with
    whitespace collapsed and the span's edge punctuation removed."""
    want = " ".join(span.casefold().split()).strip(_EDGES)
    return bool(want) and want in " ".join(generated.casefold().split())
