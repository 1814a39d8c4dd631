"""Image-LoRA adapters: the 831,516 pin, identity at init, visual tokens only, the docs/methods.md §4 maths,
generation, gradient checkpointing, IADA beside it, FLOPs, save/load and remote code, training."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import assert_one_line_error, image_batch, logits, randomise, text_batch
from safetensors.torch import load_file

from surgeon import load_model
from surgeon.heads.score import HeadScores, write_heads
from surgeon.modules.iada import IadaConfig, add_iada
from surgeon.modules.image_lora import ImageLoraConfig, add_image_lora, batch_flops, count_parameters, flops_report
from surgeon.modules.modeling_surgeon import remove_module
from surgeon.modules.folders import module_parameters

VLMS = ["qwen2_5_vl", "qwen3_vl", "llava"]
HEADS = [[0], [], [0, 1], [1]]  # tiny models: 4 layers, 2 KV heads of size 16, hidden 64


def base_model(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).eval()


# ----------------------------------------------------------------------------- the 831,516 pin
def test_qwen2_5_vl_7b_with_one_head_per_layer_trains_831516_parameters():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d, layers, d_h, r = 3584, 28, 128, 8
    expected = layers * (d * r + 1 * r * d_h + 1)  # docs/methods.md §4: A, one B_h, γ per layer
    assert expected == 831_516
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=28, num_key_value_heads=4,
                         intermediate_size=18944, vocab_size=152064),
        vision_config=dict(depth=2, out_hidden_size=d),
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    add_image_lora(model, [[h % 4] for h in range(layers)], ImageLoraConfig(rank=r))
    params = module_parameters(model, "image_lora")
    assert sum(p.numel() for p in params.values()) == expected
    assert all(p.dtype == torch.float32 for p in params.values())
    assert count_parameters([[0]] * layers, d, d_h, r) == expected
    settings = model.config.surgeon["image_lora"]
    assert (settings["hidden_size"], settings["num_kv_heads"], settings["head_dim"]) == (d, 4, d_h)


# ------------------------------------------------------------------------------ identity, text
@pytest.mark.parametrize("family", VLMS)
def test_text_only_inputs_are_untouched_once_trained(tiny_models, family):
    """Identity at init is the module-kind matrix's; here the adapters are trained (random) and a
    text-only batch still gives the base logits bit for bit, while images change them."""
    folder = tiny_models(family)
    base, model = base_model(folder), base_model(folder)
    add_image_lora(model, HEADS)
    assert all(not p.any() for n, p in module_parameters(model).items() if n.endswith(".up"))  # B = 0
    randomise(model)
    images, text = image_batch(folder), text_batch()
    assert torch.equal(logits(model, **text), logits(base, **text))
    assert not torch.allclose(logits(model, **images), logits(base, **images))
    kw = dict(max_new_tokens=5, do_sample=False)
    cached, recomputed = (model.generate(**images, use_cache=c, **kw) for c in (True, False))
    assert torch.equal(cached, recomputed)  # decode steps carry no visual token; the cache holds the adapted values


def test_values_change_only_at_visual_tokens_of_selected_heads_by_the_formula(vlm):
    """v_proj of the first adapted layer (whose input the adapters cannot have changed): text
    positions and unselected heads are untouched; selected heads get (x·A·B_h)·(α/r)·γ/√H_sel."""
    base, model = base_model(vlm), base_model(vlm)
    add_image_lora(model, [[], [], [1], [0, 1]], ImageLoraConfig(rank=4, alpha=12.0))
    randomise(model, seed=3)
    seen: dict[str, tuple] = {}
    for name, m in (("base", base), ("adapted", model)):  # runs after the adapter's hook: sees its output
        m.model.language_model.layers[2].self_attn.v_proj.register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out))
        )
    batch = image_batch(vlm, images_per_sample=(2, 1))
    logits(base, **batch), logits(model, **batch)
    (x, before), (x2, after) = seen["base"], seen["adapted"]
    assert torch.equal(x, x2)
    visual = batch["input_ids"] == model.config.image_token_id
    assert visual.sum(1).min() > 0 and (~visual).any()
    v0, v1 = before.view(*before.shape[:2], 2, 16), after.view(*after.shape[:2], 2, 16)
    assert torch.equal(v1[~visual], v0[~visual])  # text positions, both heads
    assert torch.equal(v1[visual][:, 0], v0[visual][:, 0])  # head 0 is not selected in layer 2
    p = model.surgeon.image_lora.layers["2"]
    expected = (x[visual].double() @ p.down.double() @ p.up[0].double()) * (12.0 / 4) * p.gamma.double() / math.sqrt(1)
    torch.testing.assert_close((v1[visual][:, 1] - v0[visual][:, 1]).double(), expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().max() > 1e-2




def test_beside_iada_each_kind_keeps_its_own_effect(vlm):
    iada_only, both = base_model(vlm), base_model(vlm)
    for m in (iada_only, both):
        add_iada(m, IadaConfig(block_size=2))
        randomise(m, seed=1, kind="iada")
    add_image_lora(both, HEADS)
    randomise(both, seed=2, kind="image_lora")
    assert set(both.config.surgeon) == {"iada", "image_lora"}
    images, text = image_batch(vlm), text_batch()
    assert torch.equal(logits(both, **text), logits(iada_only, **text))
    assert not torch.allclose(logits(both, **images), logits(iada_only, **images))
    remove_module(both, "image_lora")
    assert set(both.config.surgeon) == {"iada"}
    assert torch.equal(logits(both, **images), logits(iada_only, **images))


def test_the_inner_model_called_directly_runs_the_modules_too(vlm):
    """``model.model(...)`` (features, embeddings) sees the same visual tokens as ``model(...)``."""
    plain, model = base_model(vlm), base_model(vlm)
    add_iada(model, IadaConfig(block_size=2))
    add_image_lora(model, HEADS)
    randomise(model, seed=3)
    batch = image_batch(vlm)
    with torch.no_grad():
        inner = model.model(**batch).last_hidden_state
        whole = model(**batch, output_hidden_states=True).hidden_states[-1]
        base = plain.model(**batch).last_hidden_state
    assert torch.equal(inner, whole) and not torch.allclose(inner, base)


def test_bad_selections_name_the_problem(vlm):
    from surgeon.errors import ConfigError

    model = base_model(vlm)
    with pytest.raises(ConfigError, match="covers 3 layers but the model has 4"):
        add_image_lora(model, [[0], [0], [0]])
    with pytest.raises(ConfigError, match=r"layer 1 must be distinct KV heads in \[0, 2\)"):
        add_image_lora(model, [[0], [2], [], []])
    with pytest.raises(ConfigError, match="selects no head"):
        add_image_lora(model, [[], [], [], []])
    assert not hasattr(model, "surgeon") or "image_lora" not in model.surgeon


# ------------------------------------------------------------------------------------------ FLOPs
def test_flops_report_follows_the_cost_formula_and_the_measured_flops(vlm):
    from torch.utils.flop_counter import FlopCounterMode

    d, kv, d_h = 64, 2, 16
    report = flops_report([[0]] * 4, d, kv, d_h, tokens=1000, visual_tokens=250, rank=8)
    assert report.visual_fraction == 0.25
    assert report.ratio == pytest.approx(0.25 * (d + 1 * d_h) / (d + kv * d_h))  # docs/methods.md §4 "Cost"
    assert flops_report([[0]] * 4, d, kv, d_h, 1000, 250, rank=2).ratio == pytest.approx(report.ratio)

    model = base_model(vlm)
    batch = image_batch(vlm, images_per_sample=(1,))
    counts = []
    for attach in (False, True):
        if attach:
            add_image_lora(model, HEADS, ImageLoraConfig(rank=4))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(**batch)
        counts.append(counter.get_total_flops())
    measured = batch_flops(model, batch)
    assert measured.visual_tokens == int((batch["input_ids"] == model.config.image_token_id).sum()) > 0
    assert measured.tokens == batch["input_ids"].numel()
    assert counts[1] - counts[0] == measured.adapter_flops  # torch's own count of the adapter matmuls


# ----------------------------------------------------------------------- save, load, remote code


# --------------------------------------------------------------------------------------- training
def heads_json(path, selected) -> str:
    scores = [[float(len(row))] * 2 for row in selected]
    result = HeadScores("tiny", "gate", len(selected), 2, 16, 64, scores, sum(map(len, selected)), 0.5, None,
                        [len(r) for r in selected], selected)  # fmt: skip
    return str(write_heads(result, path))


def _train(model, data, out, **kw):
    from surgeon.training.config import TrainConfig
    from surgeon.training.loop import train

    base = dict(model=str(model), data=str(data), output=str(out), batch_size=4, seed=0, warmup_ratio=0.0, lr=1e-2)
    return train(TrainConfig(**{**base, **kw}))


def test_trains_alone_into_a_folder_that_links_the_base_weights(vlm, data, tmp_path):
    heads = heads_json(tmp_path / "heads.json", HEADS)
    result = _train(vlm, data, tmp_path / "run", image_lora=heads, max_steps=4)
    assert result.stats["trainable_parameters"] == count_parameters(HEADS, 64, 16, 8)
    assert result.stats["image_lora"]["flops"]["visual_tokens"] > 0
    out = tmp_path / "run"
    record = json.loads((out / "surgeon.json").read_text())
    assert record["artifact"] == "model+remote-code" and record["inputs"]["heads"]["source"] == heads
    assert os.path.samefile(out / "model-00001-of-00001.safetensors", vlm / "model.safetensors")  # linked, not rewritten
    _, info = load_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    shard = load_file(str(out / "surgeon-image_lora.safetensors"))
    assert set(shard) == {f"surgeon.image_lora.layers.{i}.{p}" for i in (0, 2, 3) for p in ("down", "up", "gamma")}
    assert all(shard[f"surgeon.image_lora.layers.{i}.up"].abs().sum() > 0 for i in (0, 2, 3))  # trained from 0
    tuned, base = load_model(out).eval(), base_model(vlm)
    images, text = image_batch(vlm), text_batch()
    assert torch.equal(logits(tuned, **text), logits(base, **text))
    assert not torch.equal(logits(tuned, **images), logits(base, **images))
    assert "auto_map" in json.loads((out / "config.json").read_text())


def test_trains_beside_iada_and_through_text_only_batches(tiny_models, data, tmp_path):
    from surgeon.modules.iada import inject_iada

    iada = inject_iada(tiny_models("qwen2_5_vl"), tmp_path / "vlm-iada", IadaConfig(block_size=2)).output
    heads = heads_json(tmp_path / "heads", [[1], [1], [], []])  # a folder: heads.json + surgeon.json
    _train(iada, data, tmp_path / "both", image_lora=heads, max_steps=2)
    gates = load_file(str(tmp_path / "both" / "surgeon-iada.safetensors"))
    assert any(k.endswith("gate") and v.abs().sum() > 0 for k, v in gates.items())  # IADA trained too
    model = load_model(tmp_path / "both")
    assert set(model.config.surgeon) == {"iada", "image_lora"}

    text_only = tmp_path / "text.jsonl"
    lines = [line for line in data.read_text().splitlines() if json.loads(line)["kind"] == "text"]
    text_only.write_text("\n".join(lines) + "\n")
    plain = heads_json(tmp_path / "plain.json", HEADS)
    _train(tiny_models("qwen2_5_vl"), data, tmp_path / "mixed", image_lora=plain, max_steps=4, batch_size=1)  # text-only batches too
    from surgeon.errors import ConfigError

    with pytest.raises(ConfigError, match="sees no image or video in .*would train nothing"):  # never a silent no-op
        _train(tiny_models("qwen2_5_vl"), text_only, tmp_path / "text", image_lora=plain, max_steps=2, batch_size=1)
    assert not (tmp_path / "text").exists()


def test_train_cli_bad_input(cli, vlm, data, tmp_path):
    heads = heads_json(tmp_path / "heads.json", HEADS)
    wrong = heads_json(tmp_path / "wrong.json", [[0]] * 6)
    base = ["train", vlm, "--data", data, "-o", tmp_path / "o"]
    assert_one_line_error(cli(*base, "--image-lora", heads, "--full"), "image_lora", "--full")
    assert_one_line_error(cli(*base, "--image-lora", heads, "--merge-lora"), "merge_lora")
    assert_one_line_error(cli(*base, "--image-lora", tmp_path / "none.json"), "none.json", "no such file")
    assert_one_line_error(cli(*base, "--image-lora", wrong), "selects heads in 6 layers", "has 4")
    assert_one_line_error(cli(*base, "--image-lora", heads, "--image-lora-rank", "0"), "image_lora_rank")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-checkpoints").exists()
