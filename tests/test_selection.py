"""``train --modules/--layers``: the grammar of prior and merge picks what trains (--full), what
LoRA wraps and what DRIFT biases; presets, layer ranges and zero matches behave as for prior; a
prior that does not cover the selection stops the run before any weight is read."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_one_line_error
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def prior(vlm, llm, tmp_path_factory):
    from surgeon.drift.prior import PriorConfig, compute_prior

    out = tmp_path_factory.mktemp("selection-prior") / "prior"
    compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(out), modules=("attn", "mlp"), layers=(0, 1, 2)))
    return out


def _train(vlm, data, out, **kw):
    from surgeon.training.config import TrainConfig
    from surgeon.training.loop import train

    common = {"model": str(vlm), "data": str(data), "output": str(out), "max_steps": 1, "batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.0}
    return train(TrainConfig(**{**common, **kw}))


def test_lora_wraps_exactly_the_selected_projections_and_loads_in_peft(vlm, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    _train(vlm, data, tmp_path / "a", modules="attn_proj", layers="1-2")
    names = sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    wrapped = {re.sub(r"^.*?layers\.(\d+)\.(.*)\.lora_[AB]\.weight$", r"\1 \2", n) for n in names}
    assert wrapped == {f"{i} self_attn.{p}_proj" for i in (1, 2) for p in "qkvo"}, wrapped
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(vlm), tmp_path / "a")
    assert sum(1 for n, _ in model.named_parameters() if "lora_A" in n) == 8


def test_full_trains_the_selection_and_leaves_the_rest_bit_for_bit(vlm, data, tmp_path):
    from surgeon.anatomy.decoder import lm_parameters
    from surgeon.modules.folders import load_model

    _train(vlm, data, tmp_path / "f", full=True, modules="gate_up,final_norm", layers="0")
    before = {n: p for n, p in lm_parameters(load_model(vlm, dtype=torch.float32))}
    after = {n: p for n, p in lm_parameters(load_model(tmp_path / "f", dtype=torch.float32))}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "norm.weight"}, changed


def test_drift_biases_only_the_selected_tensors_the_prior_covers(vlm, data, prior, tmp_path):
    from surgeon.drift.bias import Drift
    from surgeon.modules.folders import load_model
    from surgeon.training.config import TrainConfig
    from surgeon.training.lora import set_trainable

    model = load_model(vlm, dtype=torch.float32)
    chosen = set_trainable(model, full=True, train_vision=False, selection=TrainConfig("m", full=True, modules="attn_proj", layers="1").selection)
    drift = Drift.from_prior(model, prior, trained_only=True)
    assert sorted(drift.names + drift.zero) == sorted(chosen)  # (Δ = 0 where both models keep a bias at zero)
    assert {n.rsplit(".", 2)[-2] for n in chosen} == {"q_proj", "k_proj", "v_proj", "o_proj"} and {n.split(".")[1] for n in chosen} == {"1"}
    result = _train(vlm, data, tmp_path / "d", full=True, modules="attn_proj", layers="1", prior=str(prior))
    assert result.metrics["drift_tensors"] == len(drift.names)


def test_a_lora_prior_must_cover_every_adapted_weight_before_weights_load(cli, vlm, data, prior, tmp_path, monkeypatch):
    import surgeon.modules.folders as folders
    import surgeon.training.build as build

    def refuse(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(build, "load_model", refuse)
    monkeypatch.setattr(folders, "load_model", refuse)
    # the prior covers layers 0-2; LoRA by default adapts every layer's projections
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--prior", prior), "has no Δ for", "LoRA-adapted", "--layers")
    assert_one_line_error(
        cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--prior", prior, "--full", "--modules", "attn,norm", "--layers", "0"),
        "has no Δ for", "layers.0.input_layernorm.weight",
    )  # fmt: skip
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--modules", "re:nothing_here"), "'re:nothing_here'", "attn (")
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--full", "--layers", "7"), "layer 7 does not exist")
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--full", "--lora-targets", "attn"), "--full")
    assert not (tmp_path / "o").exists()


def test_a_lora_prior_with_a_covered_selection_trains(vlm, data, prior, tmp_path):
    result = _train(vlm, data, tmp_path / "l", prior=str(prior), layers="0-2", modules="attn,mlp")
    assert result.metrics["drift_tensors"] == 7 * 3  # the adapted q,k,v,o,gate,up,down weights of 3 layers


def test_default_lora_on_fused_experts_wraps_attention_and_an_explicit_mlp_is_refused(tiny_models):
    from transformers import AutoConfig

    from surgeon.errors import SelectionError
    from surgeon.training.build import empty_model
    from surgeon.training.lora import lora_modules
    from surgeon.training.config import TrainConfig

    folder = tiny_models("qwen3_vl_moe")
    model = empty_model(AutoConfig.from_pretrained(folder).to_dict())
    wrapped = lora_modules(model, TrainConfig("m").selection, strict=False)
    assert wrapped and all(".self_attn." in rel for rel in wrapped)  # the experts are fused tensors
    with pytest.raises(SelectionError, match="'mlp'.*attn \\("):
        lora_modules(model, TrainConfig("m", modules="mlp").selection)
    with pytest.raises(SelectionError, match="matched nothing"):  # the router is no linear layer either
        lora_modules(model, TrainConfig("m", modules=r"re:mlp\.gate\.weight").selection)
