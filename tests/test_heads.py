"""``surgeon score-heads``: the allocation rules, the gate probe's gradient, a planted head, the files, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import assert_one_line_error, image_batch

from surgeon.errors import ConfigError
from surgeon.heads.score import ScoreHeadsConfig, read_heads, score_heads
from surgeon.heads.budget import allocate_budget, default_budget, select_heads


# ------------------------------------------------------------------------------------ allocation
def test_allocation_sums_to_the_budget_and_respects_capacity():
    rng = random.Random(0)
    for _ in range(300):
        layers, capacity = rng.randint(1, 12), rng.randint(1, 8)
        scores = [[rng.choice([0.0, rng.random(), rng.random() ** 6, -rng.random()]) for _ in range(capacity)] for _ in range(layers)]
        budget, tau = rng.randint(1, layers * capacity), rng.choice([0.0, 0.5, 1.0, 2.0])
        k = allocate_budget(scores, budget, tau)
        assert sum(k) == budget and all(0 <= x <= capacity for x in k), (scores, budget, tau, k)
        budgets, selected = select_heads(scores, budget, tau)
        assert budgets == k and [len(s) for s in selected] == k
        for row, chosen in zip(scores, selected):  # each layer keeps its best heads
            rest = [row[h] for h in range(capacity) if h not in chosen]
            assert not chosen or not rest or min(row[h] for h in chosen) >= max(rest)


def test_a_tau_that_is_not_a_finite_non_negative_number_is_an_error():
    for tau in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ConfigError, match="tau: must be a finite number ≥ 0"):
            allocate_budget([[1.0, 2.0], [3.0, 4.0]], 2, tau)


def test_tau_zero_spreads_evenly_and_tau_one_follows_the_mass():
    scores = [[9.0, 8.0, 7.0, 6.0], [1.0, 0.5, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0]]
    for budget in range(1, 17):
        k = allocate_budget(scores, budget, tau=0.0)
        assert max(k) - min(k) <= 1 and sum(k) == budget
    # τ = 1, K = 8: masses 30, 1.5, 0.1, 6 -> 8·M/37.6 = 6.38, 0.32, 0.02, 1.28 -> 6 (capped at 4), 0, 0, 1;
    # the 3 missing go one each to the layers in mass order, skipping the full one: 6, then 1.5, then 0.1
    assert allocate_budget(scores, 8, tau=1.0) == [4, 1, 1, 2]
    # τ = 0.5, K = 4: √M = 5.48, 1.22, 0.32, 2.45 (Σ 9.47) -> 2.31, 0.52, 0.13, 1.03 -> 2, 1, 0, 1
    assert allocate_budget(scores, 4, tau=0.5) == [2, 1, 0, 1]
    # rounding up too far removes from the lowest-mass layers first: τ = 0, K = 2 -> 0.5 each -> 1, 1, 1, 1
    assert allocate_budget(scores, 2, tau=0.0) == [1, 0, 0, 1]
    assert select_heads(scores, 4, 0.5)[1] == [[0, 1], [0], [], [0]]


def test_zero_masses_follow_capacity_and_per_layer_counts():
    zeros = [[0.0, -1.0], [0.0, 0.0], [0.0, 0.0]]
    assert allocate_budget(zeros, 3, tau=1.0) == [1, 1, 1]
    assert allocate_budget(zeros, 4, tau=1.0) == [2, 1, 1]
    assert default_budget(28, 4) == 28 and default_budget(4, 2) == 2 and default_budget(1, 1) == 1
    assert select_heads([[1.0, 2.0, 3.0]] * 2, per_layer=2) == ([2, 2], [[1, 2], [1, 2]])
    with pytest.raises(ConfigError, match="per_layer: 4 exceeds the model's 3 KV heads"):
        select_heads([[1.0, 2.0, 3.0]], per_layer=4)
    with pytest.raises(ConfigError, match=r"budget: must lie in \[1, 3\]"):
        allocate_budget([[1.0, 2.0, 3.0]], 4)


# -------------------------------------------------------------------------------------- probes
def test_gate_probe_scores_are_the_squared_gradient_of_the_visual_value_scale(vlm):
    """Without the probe: d/dg of L(V[t,h]·(1+g)) at g = 0 is Σ_visual t ⟨∂L/∂V[t,h], V[t,h]⟩."""
    from transformers import AutoModelForImageTextToText

    from surgeon.modules.modeling_surgeon import token_context
    from surgeon.heads.probes import PROBES

    batch = image_batch(vlm)

    def loss_of(model):
        out = model(**batch).logits
        return torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())

    model = AutoModelForImageTextToText.from_pretrained(vlm).eval().requires_grad_(False)
    visual = batch["input_ids"] == model.config.image_token_id
    values = []
    for layer in model.model.language_model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: (out.requires_grad_(True).retain_grad(), values.append(out))[1])
    loss_of(model).backward()
    expected = torch.stack([(v.grad * v)[visual].view(-1, 2, 16).sum((0, 2)) for v in values]) ** 2

    model = AutoModelForImageTextToText.from_pretrained(vlm).eval().requires_grad_(False)
    probe = PROBES["gate"](model, token_context(model))
    probe.attach(model)
    loss_of(model).backward()
    torch.testing.assert_close(probe.batch_scores(), expected, rtol=1e-4, atol=1e-12)
    assert expected.min() > 0


@pytest.fixture(scope="module")
def planted(vlm, tmp_path_factory):
    """The tiny VLM with KV head 0 of layer 0 made to matter: its value weights scaled ×8. (In the
    first layer, so that no other head's inputs change; scaling a later head also inflates the
    gradients of every earlier head through the larger downstream signal.)"""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(vlm)
    v = model.model.language_model.layers[0].self_attn.v_proj
    with torch.no_grad():
        v.weight[:16] *= 8
        v.bias[:16] *= 8
    out = tmp_path_factory.mktemp("planted") / "vlm"
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(vlm).save_pretrained(out)
    return out


def test_gate_probe_ranks_the_planted_head_first_and_rank1_runs(planted, shapes_data):
    data = shapes_data("trl")
    for probe in ("gate", "rank1"):
        r = score_heads(ScoreHeadsConfig(model=str(planted), data=str(data), probe=probe, steps=3, budget=3))
        scores = torch.tensor(r.scores)
        assert scores.shape == (4, 2) and torch.isfinite(scores).all() and (scores >= 0).all() and scores.sum() > 0
        assert r.visual_tokens > 0 and r.batches == 3 and sum(r.layer_budgets) == 3
        assert r.flops["ratio"] < r.flops["visual_fraction"]  # 3 of 8 heads, only at visual tokens
        if probe == "gate":
            assert divmod(int(scores.argmax()), 2) == (0, 0), scores
            assert 0 in r.selected[0]


# --------------------------------------------------------------------------------------- the CLI
def test_cli_writes_heads_json_plot_and_a_pushable_folder(cli, vlm, shapes_data, tmp_path):
    from surgeon.publish.card import build_card

    data = shapes_data("trl")
    result = cli("score-heads", vlm, "--data", data, "-o", tmp_path / "heads.json", "--steps", "2", "--tau", "0",
                 "--plot", tmp_path / "heads.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "selected 2 of 8 KV heads (budget K=2, τ=0)" in result.stdout and "adapter FLOPs" in result.stdout
    assert "●" in result.stdout and "wrote" in result.stdout
    saved = json.loads((tmp_path / "heads.json").read_text())
    assert saved["format"] == "surgeon-head-scores/1" and len(saved["scores"]) == 4 and len(saved["scores"][0]) == 2
    assert saved["surgeon"]["command"] == "score-heads" and saved["surgeon"]["artifact"] == "head-scores"
    assert read_heads(tmp_path / "heads.json").selected == saved["selected"]
    assert (tmp_path / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json", "heads.png"]  # no temporary files left

    folder = tmp_path / "heads"
    result = cli("score-heads", vlm, "--data", data, "-o", folder, "--steps", "1", "--per-layer", "1", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["layer_budgets"] == [1, 1, 1, 1] and shown["per_layer"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["heads.json", "surgeon.json"]
    card = build_card(folder, "me/heads")
    assert "image-lora" in card and 'hf_hub_download("me/heads", "heads.json")' in card


def test_cli_bad_input(cli, vlm, shapes_data, tmp_path, monkeypatch):
    data = shapes_data("trl")
    base = ["score-heads", vlm, "--data", data]
    (tmp_path / "taken.json").write_text("{}")
    assert_one_line_error(cli(*base, "-o", tmp_path / "taken.json"), "already exists", "--overwrite")
    assert_one_line_error(cli(*base, "-o", tmp_path / "a.json", "--budget", "9"), "budget", "[1, 8]")
    assert_one_line_error(cli(*base, "-o", tmp_path / "a.json", "--per-layer", "3"), "per_layer", "2 KV heads")
    assert_one_line_error(cli(*base, "-o", tmp_path / "a.json", "--per-layer", "1", "--budget", "2"), "per_layer", "exclude")
    assert_one_line_error(cli(*base, "-o", tmp_path / "a.json", "--tau", "-1"), "tau")
    text_only = tmp_path / "text.jsonl"
    text_only.write_text("\n".join(x for x in data.read_text().splitlines() if json.loads(x)["kind"] == "text") + "\n")
    assert_one_line_error(cli("score-heads", vlm, "--data", text_only, "-o", tmp_path / "a.json"), "no sample with an image")
    assert_one_line_error(cli(*base[:2], "--data", tmp_path / "none.jsonl", "-o", tmp_path / "a.json"), "none.jsonl")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert_one_line_error(cli(*base, "-o", tmp_path / "a.json", "--plot", tmp_path / "p.png"), "matplotlib", "surgeon[plot]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.json", "text.jsonl"]
