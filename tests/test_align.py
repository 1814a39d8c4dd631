"""Name alignment of VLM and LLM tensors across every layout, and module-family selection."""

from __future__ import annotations

import pytest

from surgeon.demo import tiny
from surgeon.anatomy.align import align
from surgeon.hub.sources import open_checkpoint
from surgeon.errors import AlignmentError, CheckpointError, ConfigError, SelectionError
from surgeon.anatomy.families import Selection, family, format_layers, parse_layers, parse_modules, select
from surgeon.anatomy.layout import detect_layout

LAYOUTS = [(f, False) for f in tiny.TEXT_PARTNER] + [("qwen2_5_vl", True)]


def _vlm(tiny_models, family_name, memory):
    return tiny_models.memory_layout(family_name) if memory else tiny_models(family_name)


@pytest.mark.parametrize("family_name,memory", LAYOUTS, ids=[f + ("-memory" if m else "") for f, m in LAYOUTS])
def test_every_layout_pairs_every_language_model_tensor(tiny_models, family_name, memory):
    vlm_path = _vlm(tiny_models, family_name, memory)
    llm_path = tiny_models(tiny.TEXT_PARTNER[family_name], seed=1)
    with open_checkpoint(vlm_path) as vlm, open_checkpoint(llm_path) as llm:
        al = align(vlm, llm)
        lay = detect_layout(list(vlm.tensors), vlm.config)
        lm = [n for n in vlm.tensors if lay.role(n) == "language_model"]
        visual = [n for n in vlm.tensors if lay.role(n) in ("vision", "projector")]
        assert visual and len(al.vision) == len(visual)
        assert sorted(p.vlm_name for p in al.pairs) == sorted(lm)
        assert not al.unmatched_lm and not al.llm_only
        for p in al.pairs:
            assert p.vlm_name not in visual
            assert vlm.tensors[p.vlm_name].shape == llm.tensors[p.llm_name].shape == p.shape
            assert p.rows is None
            # names correspond by position in the model, whatever the prefixes are
            assert p.llm_name == "model." + p.relative or (p.relative == "lm_head.weight" == p.llm_name)
        # the default selection (attn, mlp) is the 4 attention + 3 MLP projections per layer, plus biases
        chosen = al.select(Selection())
        assert {p.family for p in chosen} == {"attn", "mlp"}
        weights = [p for p in chosen if p.relative.endswith(".weight")]
        assert len(weights) == 4 * 7
        assert al.counts(chosen)["skipped"] == len(al.pairs) - len(chosen)


def test_vocab_mismatch_pairs_shared_rows(tiny_models, vlm):
    with open_checkpoint(vlm) as v, open_checkpoint(tiny_models("qwen2", seed=1, vocab_size=520)) as big:
        al = align(v, big)
        rows = {p.relative: p.rows for p in al.pairs if p.rows is not None}
        assert rows == {"embed_tokens.weight": 512, "lm_head.weight": 512}
        assert any("520" in n and "512" in n for n in al.notes)
    with open_checkpoint(tiny_models("qwen2_5_vl", vocab_size=520)) as v, open_checkpoint(tiny_models("qwen2", seed=1)) as small:
        al = align(v, small)
        pair = next(p for p in al.pairs if p.relative == "embed_tokens.weight")
        assert pair.shape == (520, 64) and pair.rows == 512


def test_tied_embeddings_in_both_directions(tiny_models, vlm):
    tied_llm = tiny_models("qwen2", seed=1, tie_word_embeddings=True)
    with open_checkpoint(vlm) as v, open_checkpoint(tied_llm) as llm:
        al = align(v, llm)
        head = next(p for p in al.pairs if p.relative == "lm_head.weight")
        assert (head.vlm_name, head.llm_name) == ("lm_head.weight", "model.embed_tokens.weight")
        assert any("ties its head" in n for n in al.notes)
    with open_checkpoint(tiny_models("qwen2_5_vl", tie_word_embeddings=True)) as v, open_checkpoint(tiny_models("qwen2", seed=1)) as llm:
        al = align(v, llm)
        assert "lm_head.weight" not in {p.relative for p in al.pairs}
        assert al.llm_only == ("lm_head.weight",)
        with pytest.raises(SelectionError, match=r"module family 'head' matched nothing \(the model ties its output head to its embeddings: select embed\); available: .*attn \("):
            al.select(Selection(modules=("head",)))


def test_a_different_number_of_layers_is_an_error(tiny_models, vlm):
    with open_checkpoint(vlm) as v, open_checkpoint(tiny_models("qwen2", seed=1, num_hidden_layers=2)) as llm:
        with pytest.raises(AlignmentError, match="has 4 decoder layers and .* 2"):
            align(v, llm)


def test_quantized_weights_without_scales_or_of_other_methods_are_refused(tmp_path, vlm, llm):
    import json
    import shutil

    for method, message in (("fp8", r"says its weights are quantized \(fp8\) but no tensor has scales"),
                            ("gptq", r"holds gptq quantized weights, which surgeon does not read.*BF16 release")):  # fmt: skip
        folder = shutil.copytree(vlm, tmp_path / method)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": method, "weight_block_size": [128, 128]}
        (folder / "config.json").write_text(json.dumps(config))
        with open_checkpoint(folder) as v, open_checkpoint(llm) as l:
            assert v.quantization == method and l.quantization is None
            with pytest.raises(CheckpointError, match=message):
                align(v, l)
            with pytest.raises(CheckpointError, match=method):
                align(l, v)


def test_shape_mismatch_is_an_error_with_examples(tiny_models, vlm):
    with open_checkpoint(vlm) as v, open_checkpoint(tiny_models("qwen2", seed=1, intermediate_size=96)) as llm:
        with pytest.raises(AlignmentError, match=r"12 language-model tensor\(s\) .* differ in shape \(e\.g\. layers\.0\.mlp\.down_proj\.weight: VLM \[64, 128\] vs \[64, 96\]"):
            align(v, llm)


def test_no_names_in_common(tmp_path, vlm):
    import torch

    from surgeon.io.safetensors import write_file

    other = tmp_path / "gpt"
    other.mkdir()
    write_file(other / "model.safetensors", {"transformer.layers.0.attn.c_attn.weight": torch.zeros(2, 2)})
    with open_checkpoint(vlm) as v, open_checkpoint(other) as llm:
        with pytest.raises(AlignmentError, match="no language-model tensor names in common"):
            align(v, llm)


@pytest.mark.parametrize(
    "relative,expected",
    [
        ("layers.3.self_attn.q_proj.weight", "attn"),
        ("layers.3.self_attn.k_proj.bias", "attn"),
        ("layers.3.self_attn.q_norm.weight", "norm"),
        ("layers.3.input_layernorm.weight", "norm"),
        ("layers.3.post_feedforward_layernorm.weight", "norm"),
        ("layers.3.mlp.down_proj.weight", "mlp"),
        ("layers.3.mlp.experts.7.up_proj.weight", "mlp"),
        ("norm.weight", "final_norm"),
        ("embed_tokens.weight", "embed"),
        ("lm_head.weight", "head"),
        ("rotary_emb.inv_freq", "other"),
    ],
)
def test_families(relative, expected):
    assert family(relative) == expected


def test_selection_parsing_and_filters():
    assert parse_modules("attn, mlp,re:q_norm") == ("attn", "mlp", "re:q_norm")
    assert parse_layers("0-2,5") == (0, 1, 2, 5) and parse_layers(None) is None
    assert format_layers((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    for bad, field in (("attention", "modules"), ("re:(", "modules"), ("", "modules")):
        with pytest.raises(ConfigError, match=f"^{field}:"):
            parse_modules(bad)
    for bad in ("3-1", "a", "1-2-3"):
        with pytest.raises(ConfigError, match="^layers:"):
            parse_layers(bad)
    names = [f"layers.{i}.{m}" for i in range(4) for m in ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "mlp.up_proj.weight")]
    names += ["embed_tokens.weight", "norm.weight"]
    sel = Selection(modules=("attn", "embed"), layers=(1, 2, 3), skip_first=2, bias=False)
    assert select(names, sel, num_layers=4) == ["layers.2.self_attn.q_proj.weight", "layers.3.self_attn.q_proj.weight", "embed_tokens.weight"]
    assert select(names, Selection(modules=("full",)), 4) == names
    assert select(names, Selection(modules=("re:^layers\\.1\\.mlp",)), 4) == ["layers.1.mlp.up_proj.weight"]


def test_selection_errors_list_what_exists():
    names = ["layers.0.self_attn.q_proj.weight", "layers.0.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight"]
    with pytest.raises(SelectionError) as e:
        select(names, Selection(modules=("re:gate_proj",)), 2)
    msg = str(e.value)
    assert "pattern 're:gate_proj' matched nothing" in msg
    assert "attn (1 tensors, e.g. layers.0.self_attn.q_proj.weight)" in msg and "mlp (2 tensors" in msg
    with pytest.raises(SelectionError, match="module family 'norm' matched nothing"):
        select(names, Selection(modules=("attn", "norm")), 2)
    with pytest.raises(SelectionError, match="selection 'attn; layers 1' matched nothing"):
        select(names, Selection(modules=("attn",), layers=(1,)), 2)
    with pytest.raises(ConfigError, match="layer 5 does not exist; the model has 2 decoder layers"):
        select(names, Selection(layers=(5,)), 2)
    with pytest.raises(ConfigError, match="^skip_first: 2 skips every layer"):
        select(names, Selection(skip_first=2), 2)
