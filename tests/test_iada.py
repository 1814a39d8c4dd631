"""IADA blocks in a model: other architectures, the docs/methods.md §3 maths, visual tokens, training, the
0.14M pin (identity at init, gradients, copies and round trips: test_module_kinds.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import image_batch, logits, randomise, text_batch

from surgeon import load_model
from surgeon.modules.iada import IadaConfig, add_iada, plan_boundaries, plan_iada
from surgeon.modules.folders import module_parameters


# ------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "idefics3"])
def test_attaches_to_other_architectures(tiny_models, family):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if family == "idefics3" else AutoModelForCausalLM
    model = auto.from_pretrained(tiny_models(family)).eval()
    before = logits(model, **text_batch())
    add_iada(model, IadaConfig(block_size=1))
    assert len(model.surgeon.iada.blocks) == 4
    assert torch.equal(logits(model, **text_batch()), before)
    randomise(model)
    assert not torch.allclose(logits(model, **text_batch()), before)


def test_inputs_embeds_callers_get_the_same_result(tiny_models):
    """Without input_ids (inputs_embeds only) every token counts as text; a text LLM is unaffected."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2", seed=1)).eval()
    add_iada(model, IadaConfig(block_size=2))
    randomise(model)
    ids = text_batch()["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(logits(model, inputs_embeds=embeds), logits(model, input_ids=ids))




# ---------------------------------------------------------------------- the maths, token by token
def reference_boundary(h, states, down, up, gate, visual, eps=1e-6):
    """docs/methods.md §3 for one boundary, one token at a time, in plain torch (float64)."""
    h, states = h.double(), [c.double() for c in states]
    down, up, gate = down.double(), up.double(), gate.double()
    d = h.shape[-1]

    def rms(x):
        return x / torch.sqrt(x.pow(2).mean() + eps)

    out = h.clone()
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            m = int(visual[b, t])
            q = up[m] @ (down[m] @ rms(h[b, t]))
            scores = torch.stack([q @ rms(c[b, t]) for c in states]) / math.sqrt(d)
            a = torch.softmax(scores, 0)
            z = sum(a[j] * states[j][b, t] for j in range(len(states)))
            out[b, t] = h[b, t] + gate * z
    return out


def test_adaptive_blocks_match_the_reference_with_images(vlm):
    """Records the decoder's own states with hooks registered before IADA, then recomputes both
    boundaries with the reference (text and visual tokens use different D, U)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(vlm).eval()
    layers = model.model.language_model.layers
    seen: dict[str, torch.Tensor] = {}
    layers[0].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("emb", a[0] if a else k["hidden_states"]), with_kwargs=True)
    layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("out1", o))
    layers[2].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("in2", a[0] if a else k["hidden_states"]), with_kwargs=True)
    layers[3].register_forward_hook(lambda m, a, o: seen.__setitem__("out3", o))
    model.model.language_model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0]))
    add_iada(model, IadaConfig(block_size=2))
    randomise(model)
    batch = image_batch(vlm)
    logits(model, **batch)
    visual = batch["input_ids"] == model.config.image_token_id
    assert visual.sum() > 0 and (~visual).sum() > 0
    blocks = model.surgeon.iada.blocks
    expect1 = reference_boundary(seen["out1"], [seen["emb"]], blocks[0].down, blocks[0].up, blocks[0].gate, visual)
    expect2 = reference_boundary(seen["out3"], [seen["emb"], seen["out1"]], blocks[1].down, blocks[1].up, blocks[1].gate, visual)
    torch.testing.assert_close(seen["in2"].double(), expect1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["final"].double(), expect2, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(seen["in2"], seen["out1"])  # the blocks did something


def test_fixed_mode_is_a_learned_mean_over_depth(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2", seed=1)).eval()
    seen = {}
    model.model.layers[0].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("emb", a[0] if a else k["hidden_states"]), with_kwargs=True)
    model.model.layers[3].register_forward_hook(lambda m, a, o: seen.__setitem__("out3", o))
    model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0]))
    add_iada(model, IadaConfig(block_size=4, mode="fixed", gate="scalar"))
    block = model.surgeon.iada.blocks[0]
    assert {n for n, _ in block.named_parameters()} == {"depth_logits", "gate"} and block.gate.numel() == 1
    with torch.no_grad():
        block.gate.fill_(0.7)
    logits(model, **text_batch())  # logits 0: uniform mean over the one source (the embeddings)
    torch.testing.assert_close(seen["final"], seen["out3"] + 0.7 * seen["emb"])


# ------------------------------------------------------------------------------- visual tokens
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_visual_mask_with_several_images_per_sample_and_padding(tiny_models, family):
    """The mask the blocks receive marks exactly the image positions, per sample, as many as the
    images imply (Qwen: the grid after 2x2 merging; LLaVA: one token per patch)."""
    from transformers import AutoModelForImageTextToText

    folder = tiny_models(family)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    add_iada(model, IadaConfig(block_size=2))
    masks = []
    model.surgeon.iada.blocks[1].register_forward_pre_hook(lambda m, a: masks.append(a[3]))
    batch = image_batch(folder, images_per_sample=(2, 1))
    logits(model, **batch)
    (mask,) = masks
    if family == "qwen2_5_vl":
        assert torch.equal(mask, batch["mm_token_type_ids"] == 1)  # the processor's own layout
        per_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    else:
        vision = model.config.vision_config
        per_image = [(vision.image_size // vision.patch_size) ** 2] * 3
    assert mask.sum(1).tolist() == [per_image[0] + per_image[1], per_image[2]]
    assert (batch["attention_mask"][1] == 0).any()  # the second sample is padded on the left


def test_generation_with_kv_cache_equals_full_recompute(vlm):
    model = load_model(vlm).eval()
    add_iada(model, IadaConfig(block_size=2))
    randomise(model, scale=0.3)
    batch = image_batch(vlm)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**batch, use_cache=True, **kw), model.generate(**batch, use_cache=False, **kw))


# ------------------------------------------------------------------------------------- training
def _copy_task_loss(model, ids):
    """Predict the current token: the embedding output (boundary 0) holds the answer."""
    out = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), ids.flatten())


def test_gradients_reach_only_iada_and_the_gates_at_init(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2", seed=1))
    model.requires_grad_(False)
    add_iada(model, IadaConfig(block_size=2))
    _copy_task_loss(model, text_batch()["input_ids"]).backward()
    iada = module_parameters(model)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in iada)
    for name, p in iada.items():
        assert p.requires_grad and p.grad is not None, name
        if name.endswith("gate"):
            assert p.grad.abs().sum() > 0, name
        else:  # with g = 0 and U = 0 the scores cannot move yet: exactly zero
            assert p.grad.abs().sum() == 0, name


@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_both_modes_train(tiny_models, mode):
    """A tiny realisable task: reproduce the greedy tokens of the same model with random IADA weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2", seed=1))
    model.requires_grad_(False)
    module = add_iada(model, IadaConfig(block_size=2, mode=mode))
    ids = torch.randint(20, 400, (4, 16), generator=torch.Generator().manual_seed(1))
    randomise(model, seed=3, scale=1.0)
    targets = logits(model, input_ids=ids).argmax(-1)
    module.reset_parameters()
    opt = torch.optim.Adam(module_parameters(model).values(), lr=0.1)
    losses, hits = [], []
    for _ in range(20):
        opt.zero_grad()
        out = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
        hits.append((out.argmax(-1) == targets).float().mean().item())
    # the tiny model's logits are nearly flat (final norm, 0.02-std head), so the loss moves little
    assert losses[-1] < losses[0] - 0.1, losses
    assert hits[-1] > hits[0] + 0.3, hits
    moved = {n.split(".")[-1] for n, p in module_parameters(model).items() if p.abs().sum() > 0}
    assert {"gate", "up" if mode == "adaptive" else "depth_logits"} <= moved




# ------------------------------------------------------------------------ sizes and the 0.14M pin
def qwen3_vl_2b_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                           deepstack_visual_indexes=[5, 11, 17]),
    )  # fmt: skip


def test_qwen3_vl_2b_defaults_add_139264_parameters():
    from transformers import Qwen3VLForConditionalGeneration

    d, r, boundaries = 2048, 4, 28 // 7
    expected = boundaries * (4 * d * r + d)  # docs/methods.md §3: D and U per modality, plus the gate
    assert expected == 139_264
    config = qwen3_vl_2b_config()
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    plan = plan_iada(config.to_dict())  # from config.json alone
    assert plan.params == expected and [b.after_layers for b in plan.boundaries] == [7, 14, 21, 28]
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    add_iada(model, IadaConfig())
    assert sum(p.numel() for p in module_parameters(model).values()) == expected
    assert model.config.surgeon["iada"]["boundaries"] == [7, 14, 21, 28]


def test_plan_boundaries_reads_the_previous_n_d():
    plan = plan_boundaries(28, 7, depth=2)
    assert [(b.index, b.after_layers, b.sources) for b in plan] == [(1, 7, (0,)), (2, 14, (0, 1)), (3, 21, (1, 2)), (4, 28, (2, 3))]
    assert [b.after_layers for b in plan_boundaries(30, 7)] == [7, 14, 21, 28]
    assert plan_boundaries(4, 5) == []


def test_unknown_layout_names_what_was_searched():
    from surgeon.errors import LayoutError

    with pytest.raises(LayoutError, match=r"searched: .*model\.language_model\.layers.*text_model\.layers"):
        add_iada(torch.nn.Linear(4, 4))
