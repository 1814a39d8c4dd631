"""DRIFT's gradient rule: each scale against its formula, sign, α = 0, and the optimiser hook."""

from __future__ import annotations

import pytest
import torch

from surgeon.drift.bias import Drift, drift_gradient
from surgeon.errors import ConfigError


@pytest.mark.parametrize(
    "scale,expected",
    [
        # g = (3, 4): ‖g‖ = 5; Δ = (2, 0): ‖Δ‖ = 2, unit Δ = (1, 0); α = 0.5
        ("absolute", [3 - 0.5 * 2, 4]),  # g − αΔ
        ("gradnorm", [3 - 0.5 * 5 * 1, 4]),  # g − α‖g‖Δ/‖Δ‖
        ("adaptive_cosine", [3 - 0.5 * (0.6 + 1) / 2 * 5 * 1, 4]),  # c = 6/(5·2) = 0.6
    ],
)
def test_each_scale_on_a_hand_made_gradient(scale, expected):
    g, delta = torch.tensor([3.0, 4.0]), torch.tensor([2.0, 0.0])
    assert torch.allclose(drift_gradient(g, delta, 0.5, scale, norm_to=None), torch.tensor(expected))


def _reference(g, d, alpha, scale):
    """The formulas of docs/methods.md §1, written out independently."""
    g, d = g.double(), d.double()
    if scale == "absolute":
        return g - alpha * d
    unit = d / d.norm()
    if scale == "gradnorm":
        return g - alpha * g.norm() * unit
    c = torch.nn.functional.cosine_similarity(g.flatten(), d.flatten(), dim=0).clamp(-1, 1)
    return g - alpha * (c + 1) / 2 * g.norm() * unit


@pytest.mark.parametrize("scale", ["absolute", "gradnorm", "adaptive_cosine"])
def test_in_place_apply_matches_the_formula(scale):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    deltas = [torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen)]
    grads = [torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    stats = Drift([(f"p{i}", p, d) for i, (p, d) in enumerate(zip(params, deltas))], alpha=0.3, scale=scale).apply()
    assert stats.biased == 2 and stats.skipped == 0
    for p, g, d in zip(params, grads, deltas):
        assert torch.allclose(p.grad.double(), _reference(g, d, 0.3, scale), atol=1e-6)


def test_adaptive_cosine_pull_vanishes_along_delta_and_is_full_against_it():
    d = torch.tensor([1.0, 2.0, -1.0])
    along = -2 * d  # descent −g = 2d already points along Δ: c = −1, α' = 0
    assert torch.equal(drift_gradient(along, d, 1.0, "adaptive_cosine", norm_to=None), along)
    away = 3 * d  # descent points straight away from Δ: c = +1, α' = α
    assert torch.allclose(drift_gradient(away, d, 1.0, "adaptive_cosine", norm_to=None), away - away.norm() * d / d.norm())


def test_alpha_zero_leaves_gradients_bit_for_bit():
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    before = p.grad.clone()
    Drift([("p", p, torch.randn(4, 4))], alpha=0.0).apply()
    assert torch.equal(p.grad, before)


def test_sign_moves_weights_toward_the_reasoning_model():
    """With a zero task gradient, an SGD step under `absolute` moves θ_V toward θ_R = θ_V + Δ."""
    theta_v, theta_r = torch.zeros(3), torch.tensor([1.0, -2.0, 0.5])
    p = torch.nn.Parameter(theta_v.clone())
    opt = torch.optim.SGD([p], lr=0.1)
    Drift([("p", p, theta_r - theta_v)], alpha=1.0, scale="absolute").attach(opt)
    p.grad = torch.zeros(3)
    opt.step()
    assert (p.detach() - theta_r).norm() < (theta_v - theta_r).norm()
    assert torch.allclose(p.detach(), 0.1 * theta_r)


def test_bf16_gradients_keep_their_dtype():
    p = torch.nn.Parameter(torch.randn(8, 8).bfloat16())
    g = torch.randn(8, 8).bfloat16()
    p.grad = g.clone()
    d = torch.randn(8, 8)
    Drift([("p", p, d)], alpha=0.5, scale="gradnorm").apply()
    assert p.grad.dtype == torch.bfloat16
    assert torch.allclose(p.grad.float(), _reference(g.float(), d.bfloat16().float(), 0.5, "gradnorm").float(), atol=2e-2)


def test_attach_applies_drift_before_clipping():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    Drift([("p", p, torch.tensor([10.0, 0.0]))], alpha=1.0, scale="absolute").attach(opt, max_grad_norm=1.0)
    p.grad = torch.zeros(2)
    opt.step()  # g' = (−10, 0), clipped to norm 1, then θ ← θ − g'
    assert torch.allclose(p.detach(), torch.tensor([1.0, 0.0]), atol=1e-5)


def test_parameters_without_gradient_are_counted_not_biased():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.ones(2)
    stats = Drift([("a", a, torch.ones(2)), ("b", b, torch.ones(2))], alpha=1.0).apply()
    assert (stats.biased, stats.skipped) == (1, 1) and b.grad is None


def test_norm_to_scales_delta_like_the_normalised_prior():
    """A (name, param, Δ, norm_to) target acts as Δ·norm_to/‖Δ‖ while Δ stays as stored."""
    gen = torch.Generator().manual_seed(2)
    g, d = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen).bfloat16()
    a, b = torch.nn.Parameter(torch.zeros(6, 4)), torch.nn.Parameter(torch.zeros(6, 4))
    a.grad, b.grad = g.clone(), g.clone()
    scaled = d.float() * (3.0 / d.float().norm())
    Drift([("a", a, d, 3.0)], alpha=0.2, scale="absolute").apply()
    Drift([("b", b, scaled)], alpha=0.2, scale="absolute").apply()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    drift = Drift([("a", a, d, 3.0)], alpha=0.2)
    assert drift.deltas[0].dtype == torch.bfloat16 and torch.allclose(drift.delta_norms, torch.tensor([3.0]))


def test_bad_targets_are_errors():
    with pytest.raises(ConfigError, match="shape"):
        Drift([("p", torch.nn.Parameter(torch.ones(2)), torch.ones(3))])
    with pytest.raises(ConfigError, match="no parameter"):
        Drift([])
    with pytest.raises(ConfigError, match="choose one of"):
        Drift([("p", torch.nn.Parameter(torch.ones(2)), torch.ones(2))], scale="cosine")
    for alpha in (float("nan"), -1.0):
        with pytest.raises(ConfigError, match="drift_alpha: must be a finite number ≥ 0"):
            Drift([("p", torch.nn.Parameter(torch.ones(2)), torch.ones(2))], alpha=alpha)


@pytest.mark.parametrize("scale", ["absolute", "gradnorm", "adaptive_cosine"])
def test_clipping_with_drift_norms_matches_torch_clipping(scale):
    """The norms DRIFT derives (‖g'‖² = ‖g‖² − 2k⟨g,Δ⟩ + k²‖Δ‖²) clip exactly as torch does."""
    from surgeon.drift.bias import clip_grad_norm

    gen = torch.Generator().manual_seed(1)
    shapes = [(6, 5), (5,), (3, 3)]
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    grads = [torch.randn(s, generator=gen) * 3 for s in shapes]
    deltas = [torch.randn(s, generator=gen) for s in shapes[:2]]  # the third tensor is not biased
    for a, b, g in zip(ref, ours, grads):
        a.grad, b.grad = g.clone(), g.clone()
    Drift([("a", ref[0], deltas[0]), ("b", ref[1], deltas[1])], alpha=0.7, scale=scale).apply()
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    stats = Drift([("a", ours[0], deltas[0]), ("b", ours[1], deltas[1])], alpha=0.7, scale=scale).apply(norms_of=ours)
    total = clip_grad_norm(ours, 1.0, stats.total_norm)
    assert torch.allclose(total, expected, rtol=1e-5)
    for a, b in zip(ref, ours):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_drift_gradient_normalises_a_raw_delta_as_training_does():
    """Δ read raw from a prior, with norm_to = ‖θ_VLM‖: the same g' as ``Drift`` (which keeps the
    normalisation as a factor), for the scale where it matters (absolute) and one where it does not."""
    gen = torch.Generator().manual_seed(0)
    g, raw, theta = (torch.randn(6, 5, generator=gen) for _ in range(3))
    for scale in ("absolute", "adaptive_cosine"):
        param = torch.nn.Parameter(theta.clone())
        param.grad = g.clone()
        Drift([("w", param, raw, float(theta.norm()))], alpha=0.3, scale=scale).apply()
        ours = drift_gradient(g, raw, 0.3, scale, norm_to=float(theta.norm()))
        torch.testing.assert_close(ours, param.grad, rtol=1e-6, atol=1e-7)
    raw_scale = drift_gradient(g, raw, 0.3, "absolute", norm_to=None)
    assert not torch.allclose(raw_scale, drift_gradient(g, raw, 0.3, "absolute", norm_to=float(theta.norm())))
