"""Perception-aware RL reward and the reward–perception correlation (docs/methods.md §5).

    R = α·a_p + (1−α)·a

a_p is the perception accuracy of a rollout: its perception span scored against the sample's
reference description. a is end-to-end correctness: the extracted final answer against the
reference answer. The paper fixes neither scorer; surgeon's defaults (all replaceable):

- perception span: the text inside ``<perception>…</perception>`` tags (several spans are
  joined with a space), or the matches of ``perception_regex`` (group 1 if it has groups). A
  rollout without a perception span gets a_p = 0.
- ``perception_f1`` (default scorer): bag-of-words F1 after SQuAD normalisation (lower case,
  punctuation and the articles a/an/the removed). Any ``scorer(prediction, reference) -> float``
  in [0, 1] can replace it (an embedding similarity, an LLM judge…).
- ``extract_answer``: the last ``\\boxed{X}``; else the text after the last ``Answer:`` (to the
  end of its line); else the last number. ``answer_correct``: numbers compare numerically
  (``1,000`` = ``1000.0``, ``1/2`` = ``0.5``); other answers compare case- and
  punctuation-insensitively.
- a sample whose reference description is empty (a text-only sample) gets R = a.
- α = 0.5.

As a TRL GRPO reward function (dataset columns ``perception_reference`` and ``answer`` arrive as
keyword arguments):

    from surgeon.perception.reward import perception_reward, make_perception_reward
    GRPOTrainer(..., reward_funcs=[perception_reward])               # α = 0.5
    GRPOTrainer(..., reward_funcs=[make_perception_reward(alpha=0.3)])

The paper reports that the outcome reward correlates 0.65–1.00 with reasoning but only 0.34–0.43
with perception, and that a surrogate reward helps as far as it correlates with true perception
accuracy: ``reward_correlation(surrogate, truth)`` gives Pearson and Spearman coefficients.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from surgeon.data.samples import TAGGED

Scorer = Callable[[str, str], float]
_ANSWER = re.compile(r"answer\s*:\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower case, punctuation and articles removed, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def perception_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 of two descriptions after ``normalize_text``; 1.0 if both are empty."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def extract_perception(text: str, perception_regex: str | None = None) -> str | None:
    """The perception span(s) of a rollout, joined with a space; None when there is none."""
    if perception_regex is not None:
        pattern = re.compile(perception_regex)
        group = 1 if pattern.groups else 0
        found = [m.group(group) for m in pattern.finditer(text) if m.group(group)]
    else:
        found = TAGGED.findall(text)
    return " ".join(s.strip() for s in found) if found else None


def extract_answer(text: str) -> str | None:
    """The final answer: last ``\\boxed{…}``, else after the last ``Answer:``, else the last number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    found = _ANSWER.findall(text)
    if found and found[-1].strip():
        return found[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _as_number(text: str) -> float | None:
    s = text.strip().strip("$").rstrip(".").replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def answer_correct(prediction: str | None, reference: object) -> float:
    """1.0 when the extracted answer matches the reference answer, else 0.0."""
    if prediction is None or reference is None:
        return 0.0
    ref = str(reference)
    a, b = _as_number(prediction), _as_number(ref)
    if a is not None and b is not None:
        return float(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))
    return float(normalize_text(prediction) == normalize_text(ref) != "")


def completion_text(completion: object) -> str:
    """A TRL completion as text: a string, or a list of messages whose content is a string or parts."""
    if isinstance(completion, str):
        return completion
    texts = []
    for message in completion if isinstance(completion, list) else [completion]:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        texts.append(str(content or ""))
    return "".join(texts)


def score_rollout(
    text: str,
    perception_reference: str | None,
    answer: object,
    alpha: float = 0.5,
    scorer: Scorer = perception_f1,
    perception_regex: str | None = None,
) -> float:
    """``R = α·a_p + (1−α)·a`` of one rollout; ``R = a`` when the reference description is empty."""
    a = answer_correct(extract_answer(text), answer)
    if not perception_reference:
        return a
    span = extract_perception(text, perception_regex)
    a_p = float(scorer(span, perception_reference)) if span is not None else 0.0
    return alpha * a_p + (1.0 - alpha) * a


def make_perception_reward(
    alpha: float = 0.5,
    scorer: Scorer = perception_f1,
    perception_regex: str | None = None,
    reference_key: str = "perception_reference",
    answer_key: str = "answer",
) -> Callable[..., list[float]]:
    """A TRL GRPO reward function ``f(prompts, completions, **columns) -> list[float]``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")

    def perception_reward(
        prompts: Sequence[object] | None = None, completions: Sequence[object] = (), **kwargs: Any
    ) -> list[float]:
        missing = [k for k in (reference_key, answer_key) if k not in kwargs]
        if missing:
            got = ", ".join(sorted(kwargs)) or "none"
            raise ValueError(f"perception_reward needs the dataset columns {', '.join(missing)} (got: {got})")
        refs, answers = kwargs[reference_key], kwargs[answer_key]
        return [
            score_rollout(completion_text(c), ref, ans, alpha, scorer, perception_regex)
            for c, ref, ans in zip(completions, refs, answers)
        ]

    perception_reward.__name__ = "perception_reward" if alpha == 0.5 else f"perception_reward_a{alpha:g}"
    return perception_reward


perception_reward = make_perception_reward()


@dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman coefficients (NaN when either side is constant) over ``n`` rollouts."""

    pearson: float
    spearman: float
    n: int


def reward_correlation(surrogate: Sequence[float], truth: Sequence[float]) -> Correlation:
    """How well a surrogate reward tracks true perception accuracy, over the same rollouts."""
    if len(surrogate) != len(truth):
        raise ValueError(f"surrogate and truth differ in length ({len(surrogate)} vs {len(truth)})")
    if len(surrogate) < 2:
        raise ValueError("a correlation needs at least two rollouts")
    x, y = [float(v) for v in surrogate], [float(v) for v in truth]
    return Correlation(_pearson(x, y), _pearson(_ranks(x), _ranks(y)), len(x))


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
