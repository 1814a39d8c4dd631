"""Layout recognition for every supported family, in both on-disk layouts, checked against the
parameter counts of transformers' own submodules."""

from __future__ import annotations

import pytest

from surgeon.hub.sources import open_checkpoint
from surgeon.errors import LayoutError
from surgeon.anatomy.inspect import inspect_checkpoint
from surgeon.anatomy.layout import detect_layout, layer_index

# family -> (LM prefix on disk as transformers saves it, stored head, vision module, projector module)
FAMILIES = {
    "qwen2": ("model.", "lm_head.weight", None, None),
    "qwen3": ("model.", "lm_head.weight", None, None),
    "llama": ("model.", "lm_head.weight", None, None),
    "qwen2_vl": ("model.", "lm_head.weight", "visual", "visual.merger"),
    "qwen2_5_vl": ("model.", "lm_head.weight", "visual", "visual.merger"),
    "qwen3_vl": ("model.language_model.", "lm_head.weight", "visual", ("visual.merger", "visual.deepstack_merger_list")),
    "llava": ("language_model.model.", "language_model.lm_head.weight", "vision_tower", "multi_modal_projector"),
    "llava_next": ("language_model.model.", "language_model.lm_head.weight", "vision_tower", ("multi_modal_projector", "image_newline")),
    "llava_onevision": ("language_model.model.", "language_model.lm_head.weight", "vision_tower", ("multi_modal_projector", "image_newline")),
    "idefics3": ("model.text_model.", "lm_head.weight", "vision_model", "connector"),
    "smolvlm": ("model.text_model.", "lm_head.weight", "vision_model", "connector"),
    "gemma3": ("language_model.model.", None, "vision_tower", "multi_modal_projector"),
    "internvl": ("language_model.model.", None, "vision_tower", "multi_modal_projector"),
}


def _module_params(model, dotted) -> int:
    if dotted is None:
        return 0
    if isinstance(dotted, tuple):
        return sum(_module_params(model, d) for d in dotted)
    mod = model.model.get_submodule(dotted) if not hasattr(model.model, dotted) else getattr(model.model, dotted)
    return sum(p.numel() for p in mod.parameters()) if hasattr(mod, "parameters") else mod.numel()


def _load(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if hasattr(AutoConfig.from_pretrained(path), "vision_config") else AutoModelForCausalLM
    return auto.from_pretrained(path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layout_matches_transformers_modules(tiny_models, family):
    prefix, head, vision, projector = FAMILIES[family]
    path = tiny_models(family)
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
    assert (report.lm_prefix, report.lm_head, report.num_layers) == (prefix, head, 4)
    assert report.tied_embeddings == (head is None)
    model = _load(path)
    decoder = model.get_decoder()
    lm = sum(p.numel() for p in decoder.parameters()) + (model.lm_head.weight.numel() if head else 0)
    proj = _module_params(model, projector)
    vision_only = _module_params(model, vision) - (proj if vision == "visual" else 0)  # Qwen nests the merger
    assert report.params["language_model"] == lm
    assert report.params["projector"] == proj
    assert report.params["vision"] == vision_only
    assert report.params["other"] == 0
    assert report.kind == ("vlm" if vision else "llm")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "qwen2_vl"])
def test_the_other_save_layout_places_the_same_tensors(tiny_models, family):
    """transformers >= 4.52 in-memory names (``model.language_model.*``, ``model.visual.*`` …)."""
    with open_checkpoint(tiny_models(family)) as a, open_checkpoint(tiny_models.memory_layout(family)) as b:
        ra, rb = inspect_checkpoint(a), inspect_checkpoint(b)
        assert rb.lm_prefix == "model.language_model."
        assert rb.lm_head == "lm_head.weight"
        assert ra.params == rb.params
        la, lb = detect_layout(list(a.tensors), a.config), detect_layout(list(b.tensors), b.config)
        rel_a = {la.lm_relative(n) for n in a.tensors} - {None}
        rel_b = {lb.lm_relative(n) for n in b.tensors} - {None}
        assert rel_a == rel_b and "layers.0.mlp.up_proj.weight" in rel_a


def test_memory_layout_loads_in_transformers(tiny_models):
    import torch

    a, b = _load(tiny_models("qwen2_5_vl")), _load(tiny_models.memory_layout("qwen2_5_vl"))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_legacy_names_from_other_producers():
    """Names alone: LLaVA 4.x with ``vision_tower.vision_model``, InternVL remote code (``mlp1``)."""
    llava = [
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "multi_modal_projector.linear_1.weight",
    ]
    lay = detect_layout(llava, {"vision_config": {}})
    assert lay.lm_prefix == "language_model.model." and lay.lm_head == "language_model.lm_head.weight"
    assert [lay.role(n) for n in llava] == ["language_model"] * 3 + ["vision", "projector"]
    internvl = [
        "language_model.model.layers.0.attention.wqkv.weight",
        "language_model.model.tok_embeddings.weight",
        "language_model.output.weight",
        "vision_model.encoder.layers.0.attn.qkv.weight",
        "mlp1.0.weight",
    ]
    lay = detect_layout(internvl, {"llm_config": {}, "vision_config": {}})
    assert lay.lm_head == "language_model.output.weight"
    assert [lay.role(n) for n in internvl] == ["language_model"] * 3 + ["vision", "projector"]
    assert lay.lm_relative("language_model.model.layers.0.attention.wqkv.weight") == "layers.0.attention.wqkv.weight"
    assert layer_index("layers.12.mlp.up_proj.weight") == 12 and layer_index("norm.weight") is None


def test_unplaceable_checkpoint_lists_prefixes():
    with pytest.raises(LayoutError, match=r"found: decoder\.block, encoder\.block"):
        detect_layout(["encoder.block.0.layer.0.weight", "decoder.block.0.layer.0.weight"], {}, "t5")
