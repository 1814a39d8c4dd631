"""DRIFT through LoRA adapters: the factors receive the gradients of the DRIFT-biased full-weight
gradient (checked against autograd with G′ put in explicitly), α = 0 is plain LoRA bit for bit,
and the Trainer route does the same through DriftCallback on a peft model."""

from __future__ import annotations

import pytest
import torch

from surgeon.drift.bias import drift_gradient


@pytest.fixture(scope="module")
def prior(vlm, llm, tmp_path_factory):
    from surgeon.drift.prior import PriorConfig, compute_prior

    out = tmp_path_factory.mktemp("lora-prior") / "prior"
    compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(out)))
    return out


def _lora_model(vlm):
    from surgeon.modules.folders import load_model
    from surgeon.training.lora import apply_lora

    torch.manual_seed(0)
    model = apply_lora(load_model(vlm, dtype=torch.float32), 4, 8.0, "attn,mlp", 0.0, False)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0; a random B makes Bᵀ·Δ non-trivial
            torch.nn.init.normal_(p, std=0.05)
    return model


def _batch(vlm, data):
    from surgeon.data.encoding import SampleEncoder
    from surgeon.data.scan import load_samples

    encoder = SampleEncoder.from_pretrained(vlm)
    batch = encoder.collate([encoder.encode(s) for s in load_samples(data)[:2]])
    batch.pop("perception_mask")
    return batch


@pytest.mark.parametrize("scale", ["adaptive_cosine", "gradnorm", "absolute"])
def test_the_factors_get_the_gradients_of_the_biased_full_weight_gradient(vlm, data, prior, scale):
    from peft.tuners.lora import LoraLayer

    from surgeon.drift.lora import LoraDrift

    model = _lora_model(vlm)
    batch = _batch(vlm, data)
    adapters = {id(m): m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")}
    drift = LoraDrift.from_prior(model, prior, alpha=0.7, scale=scale)
    by_module = {id(a.module): a for a in drift.adapters}
    # the reference: the full-weight gradient G of every adapted weight (its base made trainable for once)
    for m in adapters.values():
        m.base_layer.weight.requires_grad_(True)
    drift.remove()  # no hooks for the reference pass
    model(**batch).loss.backward()
    expected = {}
    for key, m in adapters.items():
        a_weight, b_weight, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        g = m.base_layer.weight.grad
        assert torch.allclose(b_weight.grad, s * g @ a_weight.detach().t(), atol=1e-6)  # plain LoRA: s·G·Aᵀ
        adapter = by_module.get(key)
        g2 = drift_gradient(g, adapter.delta * adapter.factor, 0.7, scale, norm_to=None) if adapter else g
        expected[key] = (s * b_weight.detach().t() @ g2, s * g2 @ a_weight.detach().t())
    model.zero_grad(set_to_none=True)
    for m in adapters.values():
        m.base_layer.weight.requires_grad_(False)
    drift = LoraDrift.from_prior(model, prior, alpha=0.7, scale=scale)
    model(**batch).loss.backward()
    stats = drift.apply()
    assert stats.biased == len(drift.adapters) > 10
    for key, m in adapters.items():
        want_a, want_b = expected[key]
        assert torch.allclose(m.lora_A["default"].weight.grad, want_a, atol=1e-6), (m.lora_A["default"].weight.grad - want_a).abs().max()
        assert torch.allclose(m.lora_B["default"].weight.grad, want_b, atol=1e-6), (m.lora_B["default"].weight.grad - want_b).abs().max()


def test_alpha_zero_is_plain_lora_bit_for_bit_and_a_lora_prior_trains(vlm, data, prior, tmp_path):
    from safetensors.torch import load_file

    from surgeon.training.config import TrainConfig
    from surgeon.training.loop import train

    common = {"model": str(vlm), "data": str(data), "max_steps": 2, "batch_size": 2, "seed": 1, "lr": 1e-2, "warmup_ratio": 0.0}
    train(TrainConfig(output=str(tmp_path / "plain"), **common))
    train(TrainConfig(output=str(tmp_path / "zero"), prior=str(prior), drift_alpha=0.0, **common))
    biased = train(TrainConfig(output=str(tmp_path / "drift"), prior=str(prior), drift_alpha=1.0, grad_accum=2, **{**common, "batch_size": 1}))
    a, b, c = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("plain", "zero", "drift"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a) and biased.metrics["drift_tensors"] > 10
    import json

    record = json.loads((tmp_path / "drift" / "surgeon.json").read_text())
    assert record["methods"][:2] == ["drift", "lora"]


def test_refusals_are_one_line(cli, vlm, data, prior, tmp_path):
    from helpers import assert_one_line_error

    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--prior", prior, "--perception-weight", "dynamic"), "dynamic λ")
    heads = tmp_path / "h.json"
    heads.write_text('{"selected": [[0], [0], [0], [0]]}')
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--prior", prior, "--image-lora", heads), "image_lora")


def test_drift_callback_on_a_peft_model_biases_the_adapters(vlm, data, prior, tmp_path):
    from transformers import Trainer, TrainingArguments

    from helpers import trl_rows
    from surgeon import DriftCallback, PerceptionCollator

    finals = []
    for alpha in (0.0, 1.0):
        model = _lora_model(vlm)
        args = TrainingArguments(output_dir=str(tmp_path / f"t{alpha}"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                                 report_to="none", save_strategy="no", use_cpu=True, remove_unused_columns=False, seed=0, disable_tqdm=True)  # fmt: skip
        callback = DriftCallback(prior, alpha=alpha)
        trainer = Trainer(model=model, args=args, train_dataset=trl_rows(data, 4), data_collator=PerceptionCollator(vlm, base=data.parent),
                          callbacks=[callback])  # fmt: skip
        trainer.train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        if alpha:
            assert type(callback.drift).__name__ == "LoraDrift" and callback.last.biased > 10
    assert any(not torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
