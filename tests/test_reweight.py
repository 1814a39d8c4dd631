"""Perception/reasoning reweighting: fixed λ, dynamic λ, the two-backward gradient, accumulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from surgeon.perception.reweight import (
    PerceptionGradients,
    combine,
    count_span_tokens,
    dynamic_backward,
    span_losses,
    token_losses,
)


def make_batch(seed: int = 0, b: int = 3, t: int = 9, v: int = 11):
    """Random logits; labels with prompt (-100) positions, padding and a perception span."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, t - 2 :] = -100  # padding
    perception = torch.zeros(b, t, dtype=torch.bool)
    perception[:, 3:5] = True
    perception[-1, 3:5] = False  # one row without perception tokens
    perception[1, t - 1] = True  # on padding: must be ignored
    return logits, labels, perception


def plain_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_counts_and_token_losses():
    logits, labels, perception = make_batch()
    n_p, n_r = count_span_tokens(labels, perception)
    assert (n_p, n_r) == (4, (labels[:, 1:] != -100).sum().item() - 4)
    ce = token_losses(logits, labels)
    assert ce.shape == labels.shape and (ce[:, 0] == 0).all() and (ce[labels == -100] == 0).all()
    b, t = 0, 5  # entry t is the loss of predicting labels[t] from logits[t-1]
    assert math.isclose(ce[b, t].item(), -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item(), rel_tol=1e-6)


def test_fixed_lambda_at_token_share_is_plain_cross_entropy():
    logits, labels, perception = make_batch()
    losses = span_losses(logits, labels, perception)
    lam = losses.n_perception / (losses.n_perception + losses.n_reasoning)
    torch.testing.assert_close(combine(losses, lam), plain_ce(logits, labels))
    # any other λ differs, and λ = 1 / 0 select one span
    assert not torch.allclose(combine(losses, 0.9), plain_ce(logits, labels))
    assert combine(losses, 1.0) == losses.perception and combine(losses, 0.0) == losses.reasoning


def test_fixed_lambda_matches_the_models_own_loss(tiny_models, shapes_data):
    from transformers import AutoModelForImageTextToText

    from surgeon.data.scan import load_samples
    from surgeon.data.encoding import SampleEncoder

    encoder = SampleEncoder.from_pretrained(tiny_models("qwen2_5_vl"))
    batch = encoder.collate([encoder.encode(s) for s in load_samples(shapes_data("trl"))[:4]])
    perception = batch.pop("perception_mask")
    model = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_5_vl")).eval()
    with torch.no_grad():
        out = model(**batch)
    losses = span_losses(out.logits, batch["labels"], perception)
    assert losses.n_perception > 0 and losses.n_reasoning > 0
    lam = losses.n_perception / (losses.n_perception + losses.n_reasoning)
    torch.testing.assert_close(combine(losses, lam), out.loss)


def test_empty_perception_span_trains_on_reasoning_only():
    logits, labels, _ = make_batch()
    none = torch.zeros_like(labels, dtype=torch.bool)
    losses = span_losses(logits, labels, none)
    assert losses.n_perception == 0 and losses.perception.item() == 0.0
    torch.testing.assert_close(combine(losses, 0.7), plain_ce(logits, labels))


def closed_form_grads(logits: torch.Tensor, labels: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """∂/∂logits of the mean CE over ``span`` positions: (softmax − onehot)/N at t−1 for each t."""
    grad = torch.zeros_like(logits)
    n = int(span.sum())
    for b, t in span.nonzero().tolist():
        row = torch.softmax(logits[b, t - 1], -1).clone()
        row[labels[b, t]] -= 1
        grad[b, t - 1] += row / n
    return grad


def spans(labels, perception):
    sup = labels != -100
    sup[:, 0] = False
    return perception & sup, sup & ~(perception & sup)


def test_dynamic_lambda_on_a_hand_made_case():
    logits, labels, perception = make_batch(seed=1)
    param = torch.nn.Parameter(logits.clone())
    p_span, r_span = spans(labels, perception)
    g_p, g_r = closed_form_grads(logits, labels, p_span), closed_form_grads(logits, labels, r_span)
    n_p, n_r = g_p.norm().item(), g_r.norm().item()
    lam = n_r / (n_p + n_r)
    result = dynamic_backward([param], span_losses(param, labels, perception))
    assert math.isclose(result.lam, lam, rel_tol=1e-5)
    assert math.isclose(result.norm_perception, n_p, rel_tol=1e-5) and math.isclose(result.norm_reasoning, n_r, rel_tol=1e-5)
    torch.testing.assert_close(param.grad, lam * g_p + (1 - lam) * g_r)


def test_combined_gradient_matches_autograd_on_a_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 11))
    model[0].weight.requires_grad_(False)  # a frozen parameter is left alone
    _, labels, perception = make_batch(seed=2)
    inputs = labels.clamp(min=0)
    params = [p for p in model.parameters() if p.requires_grad]

    losses = span_losses(model(inputs), labels, perception)
    g_p = torch.autograd.grad(losses.perception, params, retain_graph=True)
    g_r = torch.autograd.grad(losses.reasoning, params)
    norm_p = torch.sqrt(sum((g**2).sum() for g in g_p)).item()
    norm_r = torch.sqrt(sum((g**2).sum() for g in g_r)).item()
    lam = norm_r / (norm_p + norm_r)

    result = dynamic_backward(model.parameters(), span_losses(model(inputs), labels, perception))
    assert math.isclose(result.lam, lam, rel_tol=1e-5)
    for p, a, b in zip(params, g_p, g_r):
        torch.testing.assert_close(p.grad, lam * a + (1 - lam) * b)
    assert model[0].weight.grad is None
    # the update direction is proportional to g_p/|g_p| + g_r/|g_r|
    direction = torch.cat([(a / norm_p + b / norm_r).flatten() for a, b in zip(g_p, g_r)])
    got = torch.cat([p.grad.flatten() for p in params])
    assert torch.nn.functional.cosine_similarity(got, direction, dim=0).item() > 1 - 1e-5


def test_accumulated_micro_batches_equal_the_full_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    _, labels, perception = make_batch(seed=3, b=4)
    inputs = labels.clamp(min=0)

    full = dynamic_backward(model.parameters(), span_losses(model(inputs), labels, perception))
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    totals = count_span_tokens(labels, perception)
    grads = PerceptionGradients(model.parameters())
    for rows in (slice(0, 1), slice(1, 4)):
        grads.backward(span_losses(model(inputs[rows]), labels[rows], perception[rows], totals=totals))
        assert all(p.grad is None for p in model.parameters())
    result = grads.apply()
    assert math.isclose(result.lam, full.lam, rel_tol=1e-5)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


def test_dynamic_step_without_perception_tokens_is_plain_reasoning_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 11)
    logits_in = torch.randn(2, 6, 4)
    _, labels, _ = make_batch(b=2, t=6)
    none = torch.zeros_like(labels, dtype=torch.bool)
    result = dynamic_backward(model.parameters(), span_losses(model(logits_in), labels, none))
    assert result.lam == 0.0 and result.norm_perception == 0.0
    expected = torch.autograd.grad(plain_ce(model(logits_in), labels), list(model.parameters()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


def test_existing_gradients_are_refused():
    model = torch.nn.Linear(4, 11)
    model.weight.grad = torch.zeros_like(model.weight)
    _, labels, perception = make_batch(b=2, t=6)
    with pytest.raises(RuntimeError, match="zero_grad"):
        dynamic_backward(model.parameters(), span_losses(model(torch.randn(2, 6, 4)), labels, perception))


def test_reduce_sees_every_buffer_on_every_rank():
    """A rank without perception tokens still takes part in every reduction (zeros), so collectives match."""
    model = torch.nn.Linear(4, 11)
    _, labels, _ = make_batch(b=2, t=6)
    none = torch.zeros_like(labels, dtype=torch.bool)
    seen = []
    grads = PerceptionGradients(model.parameters())
    grads.backward(span_losses(model(torch.randn(2, 6, 4)), labels, none, totals=(3, 8)))
    result = grads.apply(reduce=lambda t: seen.append(t.shape))
    assert seen == [model.weight.shape, model.bias.shape] * 2
    # the step has perception tokens (on other ranks), so λ follows the formula: ‖g_r‖ / (0 + ‖g_r‖)
    assert result.lam == 1.0 and result.norm_perception == 0.0 and result.norm_reasoning > 0
