"""Perception-aware reward and reward–perception correlation, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from surgeon.perception.reward import (
    answer_correct,
    extract_answer,
    extract_perception,
    make_perception_reward,
    perception_f1,
    perception_reward,
    reward_correlation,
)


def test_perception_f1_by_hand():
    # pred tokens {image, shows, red, circle}; ref {red, circle, on, left}: 2 common -> P = R = 1/2
    assert perception_f1("The image shows a red circle.", "A red circle on the left") == pytest.approx(0.5)
    # pred {red, red, dot}; ref {red, dot, dot, dot}: common = min counts = 1 + 1 -> P = 2/3, R = 1/2
    assert perception_f1("red red dot", "red dot dot dot") == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert perception_f1("Blue, square!", "the blue square") == 1.0
    assert perception_f1("green", "red") == 0.0 and perception_f1("", "") == 1.0


@pytest.mark.parametrize(
    "text,answer",
    [
        ("3 + 4 = 7, so the answer is 7. Answer: 7", "7"),
        ("First \\boxed{12}, then \\boxed{\\frac{1}{2}} at last. Answer: 3", "\\frac{1}{2}"),
        ("Answer: red\nThat's it.", "red"),
        ("The totals are 12 and 1,013.5 units", "1,013.5"),
        ("no answer here", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answer_correct():
    assert answer_correct("1,000", 1000) == 1.0 and answer_correct("1/2", "0.5") == 1.0
    assert answer_correct("Red.", "red") == 1.0 and answer_correct("**B**", "b") == 1.0
    assert answer_correct("blue", "red") == 0.0 and answer_correct(None, "red") == 0.0 and answer_correct("7", "8") == 0.0


def test_extract_perception():
    text = "<perception>A red dot.</perception> and <perception>a blue one</perception>. Answer: 2"
    assert extract_perception(text) == "A red dot. a blue one"
    assert extract_perception("Answer: 2") is None
    assert extract_perception("I see: two dots. So 2.", r"I see: (.*?\.)") == "two dots."


def test_trl_reward_function_with_string_and_conversational_completions():
    refs = ["The image shows a red circle", "The image shows a red circle", "", "A blue square"]
    answers = ["2", "2", "18", "3"]
    completions = [
        "<perception>a red circle</perception> so 2. Answer: 2",  # a_p = F1({red,circle},{image,shows,red,circle}) = 2/3; a = 1
        [{"role": "assistant", "content": "<perception>a red circle</perception> Answer: 5"}],  # a_p = 2/3; a = 0
        [{"role": "assistant", "content": [{"type": "text", "text": "8 + 10 = 18. Answer: 18"}]}],  # text-only: R = a = 1
        "Answer: 3",  # no perception span: a_p = 0; a = 1
    ]
    rewards = perception_reward(prompts=["p"] * 4, completions=completions, perception_reference=refs, answer=answers, trainer_state=None)
    assert rewards == pytest.approx([0.5 * 2 / 3 + 0.5, 0.5 * 2 / 3, 1.0, 0.5])
    weighted = make_perception_reward(alpha=0.25)
    assert weighted(completions=completions[:1], perception_reference=refs[:1], answer=answers[:1]) == pytest.approx([0.25 * 2 / 3 + 0.75])
    assert weighted.__name__ == "perception_reward_a0.25"


def test_custom_scorer_and_missing_columns():
    exact = make_perception_reward(alpha=1.0, scorer=lambda pred, ref: float(pred == ref))
    assert exact(completions=["<perception>x</perception>", "<perception>y</perception>"], perception_reference=["x", "x"], answer=["", ""]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="perception_reference"):
        perception_reward(prompts=["p"], completions=["c"], answer=["1"])
    with pytest.raises(ValueError, match="alpha"):
        make_perception_reward(alpha=1.5)


def test_reward_correlation_by_hand():
    # ranks equal the values; Σd² = 4, n = 5: Spearman = 1 − 6·4/(5·24) = 0.8; Pearson is the same here
    c = reward_correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert c.pearson == pytest.approx(0.8) and c.spearman == pytest.approx(0.8) and c.n == 5
    # a monotone but non-linear relation: Spearman 1; Pearson of (x, x³) for x = 1..4 worked out by hand
    c = reward_correlation([1, 2, 3, 4], [1, 8, 27, 64])
    dx, dy = [-1.5, -0.5, 0.5, 1.5], [1 - 25, 8 - 25, 27 - 25, 64 - 25]
    pearson = sum(a * b for a, b in zip(dx, dy)) / math.sqrt(sum(a * a for a in dx) * sum(b * b for b in dy))
    assert c.spearman == pytest.approx(1.0) and c.pearson == pytest.approx(pearson)
    # ties take their average rank: x ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4) -> 4.5 / sqrt(4.5 · 5)
    assert reward_correlation([1, 2, 2, 3], [1, 2, 3, 4]).spearman == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(reward_correlation([1, 1, 1], [1, 2, 3]).pearson)
    with pytest.raises(ValueError, match="differ in length"):
        reward_correlation([1, 2], [1])
    with pytest.raises(ValueError, match="at least two"):
        reward_correlation([1], [1])
