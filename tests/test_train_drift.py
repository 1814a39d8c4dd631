"""DRIFT inside ``surgeon train``: α = 0 is plain SFT, the prior pulls, and the update does not
depend on how the global batch is split (2-process DDP with gloo versus 1 process)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_surgeon
from safetensors.torch import load_file

from surgeon.training.config import TrainConfig
from surgeon.training.loop import train


@pytest.fixture(scope="module")
def prior(vlm, tmp_path_factory):
    from surgeon.demo import tiny
    from surgeon.drift.prior import PriorConfig, compute_prior

    root = tmp_path_factory.mktemp("drift")
    reasoning = tiny.build_reasoning_llm(vlm, root / "r1", scale=0.5)
    compute_prior(PriorConfig(reasoning=str(reasoning), vlm=str(vlm), output=str(root / "prior")))
    return root / "prior"


def _config(vlm, data, out, **kw):
    base = dict(model=str(vlm), data=str(data), output=str(out), batch_size=2, seed=0, warmup_ratio=0.0, full=True, lr=1e-3)
    return TrainConfig(**{**base, **kw})


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_alpha_zero_is_exactly_plain_sft(vlm, data, prior, tmp_path):
    train(_config(vlm, data, tmp_path / "plain", max_steps=3))
    result = train(_config(vlm, data, tmp_path / "a0", max_steps=3, prior=str(prior), drift_alpha=0.0))
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "a0")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # attn (q,k,v,o + 3 biases) and mlp (3) × 4 layers; the tiny models' q/k/v biases are 0 in both: Δ = 0 is left alone
    assert (result.stats["drift"]["tensors"], result.stats["drift"]["zero_delta"]) == (28, 12)


def test_drift_pulls_the_biased_weights_toward_the_reasoning_model(vlm, data, prior, tmp_path):
    """θ_R = θ_VLM + Δ: after the same step, DRIFT's weights are closer to θ_R than plain SFT's,
    for every biased tensor, and tensors outside the prior move exactly as without DRIFT."""
    from surgeon.drift.prior import open_prior

    train(_config(vlm, data, tmp_path / "plain", max_steps=1))
    train(_config(vlm, data, tmp_path / "drift", max_steps=1, prior=str(prior), drift_scale="absolute", drift_alpha=1e-2))
    plain, drifted, start = _weights(tmp_path / "plain"), _weights(tmp_path / "drift"), _weights(vlm)
    with open_prior(prior) as p:
        assert len(p.names) == 40
        pulled = [n for n in p.names if p.read(n).norm() > 0]  # the tiny VLM's q/k/v biases are 0 in both models
        assert len(pulled) == 28
        for name in pulled:
            target = start[name] + p.read(name)
            assert (drifted[name] - target).norm() < (plain[name] - target).norm(), name
    untouched = "model.layers.0.input_layernorm.weight"  # norms are not in the default prior
    assert torch.equal(plain[untouched], drifted[untouched])
    metrics = [json.loads(line) for line in (tmp_path / "drift" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["drift_tensors"] == 28 for m in metrics)  # every tensor with a non-zero Δ
    assert all(0 < m["drift_coefficient"] < 1e3 for m in metrics)  # a figure about the biased tensors


def test_loss_goes_down_with_drift(vlm, data, prior, tmp_path):
    train(_config(vlm, data, tmp_path / "d", max_steps=12, batch_size=4, lr=3e-3, prior=str(prior)))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


@pytest.mark.slow
def test_two_processes_give_the_weights_of_one(vlm, data, prior, tmp_path):
    """torchrun, 2 CPU processes (gloo), batch 2 each, versus 1 process with 2 accumulation steps;
    both sides are fresh processes with one intra-op thread, so they reduce in the same order."""
    args = ["train", vlm, "--data", data, "--full", "--lr", "1e-3", "--seed", "3", "--batch-size", "2",
            "--max-steps", "3", "--warmup-ratio", "0", "--prior", prior, "--perception-weight", "0.7"]  # fmt: skip
    two = run_surgeon([*args, "-o", tmp_path / "two", "--grad-accum", "1"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_surgeon([*args, "-o", tmp_path / "one", "--grad-accum", "2"], nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: same micro-batches, sums, threads
    assert json.loads((tmp_path / "two" / "surgeon.json").read_text())["stats"]["world_size"] == 2


def test_from_prior_takes_the_model_itself(vlm, prior):
    """The entry point for other loops (TRL, your own): ``Drift.from_prior(model, prior)``."""
    from transformers import AutoModelForImageTextToText

    from surgeon.drift.bias import Drift
    from surgeon.drift.prior import open_prior

    model = AutoModelForImageTextToText.from_pretrained(vlm)
    drift = Drift.from_prior(model, prior)
    with open_prior(prior) as p:
        assert len(drift.params) + len(drift.zero) == len(p.names) == 40 and len(drift.zero) == 12
    by_id = {id(param): name for name, param in model.named_parameters()}
    assert all(by_id[id(param)].endswith(name) for name, param in zip(drift.names, drift.params))
