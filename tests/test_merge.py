"""Merge baselines: each method equals its docs/methods.md §2 formula (written here in plain torch),
everything else is copied byte for byte, and the output loads and runs in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error

from surgeon.demo import tiny
from surgeon.hub.sources import open_checkpoint
from surgeon.anatomy.layout import detect_layout, layer_index
from surgeon.merge import METHODS
from surgeon.merge.engine import MergeConfig, merge_models

W, DENSITY = 0.7, 0.3


@pytest.fixture(scope="module")
def reasoning(vlm, tmp_path_factory):
    return tiny.build_reasoning_llm(vlm, tmp_path_factory.mktemp("r1") / "r1", seed=1)


@pytest.fixture(scope="module")
def reasoning2(vlm, tmp_path_factory):
    return tiny.build_reasoning_llm(vlm, tmp_path_factory.mktemp("r2") / "r2", seed=2, scale=0.08)


def _merge(tmp_path, vlm, reasoning, method, name="merged", **kw):
    models = tuple(str(r) for r in (reasoning if isinstance(reasoning, (list, tuple)) else [reasoning]))
    merge_models(MergeConfig(reasoning=models, vlm=str(vlm), output=str(tmp_path / name), method=method, **kw))
    return tmp_path / name


def _raw(ckpt, name):
    info = ckpt.tensors[name]
    f = ckpt.handle(info.file)
    f.seek(info.start)
    return f.read(info.nbytes)


# ---------------------------------------------------------------- the formulas, independently


def _top_k_trim(t, density):
    k = int(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    threshold = t.abs().reshape(-1).kthvalue(t.numel() - k + 1).values
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def _disjoint_mean(taus):
    stacked = torch.stack(taus)
    sign = stacked.sum(0).sign()
    agree = (stacked.sign() == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def expected(method, v, rs, layer=None):
    taus = [r - v for r in rs]
    if method == "linear":
        return (1 - W) * v + W * (sum(rs) / len(rs))
    if method == "task-arithmetic":
        return v + W * sum(taus)
    if method == "ties":
        return v + W * _disjoint_mean([_top_k_trim(t, DENSITY) for t in taus])
    if method == "layer-swap":
        return rs[0] if layer in (1, 2) else v
    raise AssertionError(method)


EXACT = {"linear": dict(weight=W), "task-arithmetic": dict(weight=W), "ties": dict(weight=W, density=DENSITY), "layer-swap": dict(layers=(1, 2))}


@pytest.mark.parametrize("method", list(EXACT))
def test_method_equals_its_formula(tmp_path, vlm, reasoning, method):
    out = _merge(tmp_path, vlm, reasoning, method, **EXACT[method])
    with open_checkpoint(vlm) as v, open_checkpoint(reasoning) as r, open_checkpoint(out) as m:
        assert list(m.tensors) == list(v.tensors)
        lay = detect_layout(list(v.tensors), v.config)
        changed = differs = 0
        for name, info in v.tensors.items():
            assert (m.tensors[name].dtype, m.tensors[name].shape) == (info.dtype, info.shape)
            rel = lay.lm_relative(name)
            if rel is None:
                assert _raw(m, name) == _raw(v, name), name  # vision tower and projector: byte for byte
                continue
            want = expected(method, v.read(name), [r.read(r_name(rel))], layer_index(rel))
            torch.testing.assert_close(m.read(name), want, rtol=1e-6, atol=1e-7, msg=name)
            changed += not torch.equal(m.read(name), v.read(name))
            differs += not torch.equal(r.read(r_name(rel)), v.read(name)) and (method != "layer-swap" or layer_index(rel) in (1, 2))
        assert changed == differs > 0
    record = json.loads((out / "surgeon.json").read_text())
    assert record["artifact"] == "model" and record["command"] == "merge"
    assert {"config.json", "processor_config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }


def r_name(rel):
    return rel if rel == "lm_head.weight" else "model." + rel


@pytest.mark.parametrize("method", ["linear", "task-arithmetic", "ties"])
def test_several_reasoning_models(tmp_path, vlm, reasoning, reasoning2, method):
    out = _merge(tmp_path, vlm, [reasoning, reasoning2], method, **EXACT[method])
    with open_checkpoint(vlm) as v, open_checkpoint(reasoning) as r1, open_checkpoint(reasoning2) as r2, open_checkpoint(out) as m:
        for name in v.tensors:
            if not name.startswith(("model.", "lm_head")):
                continue
            want = expected(method, v.read(name), [r1.read(name), r2.read(name)])
            torch.testing.assert_close(m.read(name), want, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("k", [1, 7, 500, 999, 1000])
def test_magnitude_thresholds_are_exact_kth_largest(k):
    from surgeon.merge.thresholds import MagnitudeThresholds

    g = torch.Generator().manual_seed(k)
    taus = [torch.randn(1000, generator=g).to(torch.bfloat16).float(), torch.randn(1000, generator=g) * 1e-3]
    taus[0][:50] = 0  # zeros and repeated (bf16-rounded) magnitudes
    select = MagnitudeThresholds(2, k)
    for visit, done in ((select.count_high, select.pick), (select.count_low, select.finish)):
        for a in range(0, 1000, 300):  # tile by tile
            visit([t[a : a + 300] for t in taus])
        done()
    assert select.values == tuple(float(t.abs().topk(k).values[-1]) for t in taus)


def test_ties_sign_election_disagrees_somewhere(vlm, reasoning, reasoning2):
    """Guard that the two-model TIES test exercises the election: trimmed signs often disagree."""
    with open_checkpoint(vlm) as v, open_checkpoint(reasoning) as r1, open_checkpoint(reasoning2) as r2:
        name = "model.layers.0.mlp.up_proj.weight"
        t1, t2 = (_top_k_trim(r.read(name) - v.read(name), DENSITY) for r in (r1, r2))
        assert ((t1 * t2) < 0).sum() > 50


def test_dare_drops_and_rescales(tmp_path, vlm, reasoning):
    out = _merge(tmp_path, vlm, reasoning, "dare-linear", weight=W, density=DENSITY, seed=7)
    kept = total = 0
    with open_checkpoint(vlm) as v, open_checkpoint(reasoning) as r, open_checkpoint(out) as m:
        for name in v.tensors:
            if not name.startswith(("model.", "lm_head")):
                assert _raw(m, name) == _raw(v, name)
                continue
            base, tau = v.read(name), r.read(name) - v.read(name)
            got = m.read(name)
            rescaled = base + W * (tau / DENSITY)
            assert bool(((got == base) | (got == rescaled)).all()), name  # dropped, or kept and rescaled exactly
            live = tau != 0
            kept += int((got != base)[live].sum())
            total += int(live.sum())
    assert abs(kept / total - DENSITY) < 0.02, kept / total


def test_dare_is_seeded_and_independent_of_layout(tmp_path, tiny_models, vlm, reasoning):
    a = _merge(tmp_path, vlm, reasoning, "dare-linear", "a", seed=3)
    b = _merge(tmp_path, vlm, reasoning, "dare-linear", "b", seed=3)
    c = _merge(tmp_path, vlm, reasoning, "dare-linear", "c", seed=4)
    mem = _merge(tmp_path, tiny_models.memory_layout("qwen2_5_vl"), reasoning, "dare-linear", "mem", seed=3)
    ties1 = _merge(tmp_path, vlm, reasoning, "dare-ties", "t", seed=3)
    name = "model.layers.2.mlp.gate_proj.weight"
    with open_checkpoint(a) as ma, open_checkpoint(b) as mb, open_checkpoint(c) as mc, open_checkpoint(mem) as mm, open_checkpoint(ties1) as mt:
        assert all(_raw(ma, n) == _raw(mb, n) for n in ma.tensors)
        assert not torch.equal(ma.read(name), mc.read(name))
        assert torch.equal(ma.read(name), mm.read("model.language_model.layers.2.mlp.gate_proj.weight"))
        # with one reasoning model the sign election is trivial: dare-ties == dare-linear
        assert all(torch.equal(ma.read(n), mt.read(n)) for n in ma.tensors)


@pytest.mark.parametrize("method", ["ties", "dare-ties"])
def test_results_do_not_depend_on_block_and_tile_size(tmp_path, monkeypatch, vlm, reasoning, reasoning2, method):
    """TIES thresholds come from histograms over all tiles; DARE draws from one generator per
    tensor across tiles: both must give the same bytes however the tensors are cut."""
    import surgeon.io.streaming

    whole = _merge(tmp_path, vlm, [reasoning, reasoning2], method, "whole", density=DENSITY)
    monkeypatch.setattr(surgeon.io.streaming, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(surgeon.io.streaming, "TILE_ELEMENTS", 300)
    cut = _merge(tmp_path, vlm, [reasoning, reasoning2], method, "cut", density=DENSITY)
    with open_checkpoint(whole) as a, open_checkpoint(cut) as b:
        assert all(_raw(a, n) == _raw(b, n) for n in a.tensors)


def test_dare_ties_with_two_models(tmp_path, vlm, reasoning, reasoning2):
    out = _merge(tmp_path, vlm, [reasoning, reasoning2], "dare-ties", weight=W, density=DENSITY)
    name = "model.layers.1.self_attn.o_proj.weight"
    with open_checkpoint(vlm) as v, open_checkpoint(reasoning) as r1, open_checkpoint(reasoning2) as r2, open_checkpoint(out) as m:
        base = v.read(name)
        t1, t2 = (r1.read(name) - base) / DENSITY, (r2.read(name) - base) / DENSITY
        zero = torch.zeros_like(t1)
        candidates = [base + W * _disjoint_mean([a, b]) for a, b in ((zero, zero), (t1, zero), (zero, t2), (t1, t2))]
        got = m.read(name)
        close = torch.stack([torch.isclose(got, c, rtol=1e-6, atol=1e-7) for c in candidates])
        assert bool(close.any(0).all())
        both = close[3] & ~close[1] & ~close[2]
        assert 0.03 < both.float().mean() < 0.2  # both kept: about density²


def test_weight_zero_is_the_vlm_and_linear_one_is_the_reasoning_model(tmp_path, vlm, reasoning):
    same = _merge(tmp_path, vlm, reasoning, "task-arithmetic", "zero", weight=0.0)
    full = _merge(tmp_path, vlm, reasoning, "linear", "one", weight=1.0)
    with open_checkpoint(vlm) as v, open_checkpoint(same) as s, open_checkpoint(full) as f, open_checkpoint(reasoning) as r:
        assert all(_raw(s, n) == _raw(v, n) for n in v.tensors)
        assert torch.equal(f.read("model.layers.3.mlp.down_proj.weight"), r.read("model.layers.3.mlp.down_proj.weight"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_lerp_rounds_like_fp32_arithmetic(dtype):
    """The fused path (one ``lerp`` on stored-dtype blocks) must equal converting to fp32,
    computing θ_V + w·(θ_R − θ_V) there and casting back, bit for bit."""
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(1 << 16, generator=g) * torch.logspace(-3, 1, 1 << 16)).to(dtype)
    r = (v.float() + 0.01 * torch.randn(1 << 16, generator=g)).to(dtype)
    for w in (0.0, 0.3, 0.5, 0.7, 1.0):
        assert torch.equal(torch.lerp(v, r, w), torch.lerp(v.float(), r.float(), w).to(dtype)), w


def test_bf16_merge_keeps_dtypes_and_follows_the_formula(tmp_path, tiny_models):
    vlm16, llm16 = tiny_models("qwen2_5_vl", dtype=torch.bfloat16), tiny_models("qwen2", seed=1, dtype=torch.bfloat16)
    out = _merge(tmp_path, vlm16, llm16, "task-arithmetic", weight=W)
    with open_checkpoint(vlm16) as v, open_checkpoint(llm16) as r, open_checkpoint(out) as m:
        assert {i.dtype for i in m.tensors.values()} == {"BF16"}
        name = "model.layers.0.self_attn.q_proj.weight"
        want = expected("task-arithmetic", v.read(name).float(), [r.read(name).float()]).to(torch.bfloat16)
        torch.testing.assert_close(m.read(name), want, rtol=0.01, atol=1e-3)
        assert _raw(m, "visual.blocks.0.attn.qkv.weight") == _raw(v, "visual.blocks.0.attn.qkv.weight")


def test_vocab_mismatch_and_tied_embeddings(tmp_path, tiny_models, vlm):
    big_vlm, llm = tiny_models("qwen2_5_vl", vocab_size=520), tiny_models("qwen2", seed=1)
    out = _merge(tmp_path, big_vlm, llm, "task-arithmetic", "vocab", weight=W)
    with open_checkpoint(big_vlm) as v, open_checkpoint(llm) as r, open_checkpoint(out) as m:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            got, base = m.read(name), v.read(name)
            torch.testing.assert_close(got[:512], expected("task-arithmetic", base[:512], [r.read(name)]))
            assert torch.equal(got[512:], base[512:])
    tied = tiny_models("qwen2", seed=1, tie_word_embeddings=True)
    out = _merge(tmp_path, vlm, tied, "task-arithmetic", "tied", weight=W)
    with open_checkpoint(vlm) as v, open_checkpoint(tied) as r, open_checkpoint(out) as m:
        torch.testing.assert_close(m.read("lm_head.weight"), expected("task-arithmetic", v.read("lm_head.weight"), [r.read("model.embed_tokens.weight")]))


def test_merged_folder_loads_and_runs_with_an_image(tmp_path, vlm, reasoning):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = _merge(tmp_path, vlm, reasoning, "task-arithmetic")
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 56), (200, 30, 30))], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 512) and torch.isfinite(logits).all()
    with open_checkpoint(out) as m:
        torch.testing.assert_close(model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"], m.read("model.layers.0.mlp.up_proj.weight"))


# ---------------------------------------------------------------- the command


def test_cli_registry_and_help_agree(cli):
    from surgeon.cli.merge import METHOD_NAMES

    assert METHOD_NAMES == list(METHODS)
    help_text = cli("merge", "--help").stdout
    assert all(name in help_text for name in METHODS)


def test_cli_merge(cli, tmp_path, vlm, reasoning):
    result = cli("merge", "--reasoning", reasoning, "--vlm", vlm, "-o", tmp_path / "m", "--method", "ties", "--density", "0.5")
    assert result.exit_code == 0, result.output
    assert "ties merge (weight=0.5, density=0.5) written to" in result.stdout
    record = json.loads((tmp_path / "m" / "surgeon.json").read_text())
    assert record["stats"]["params"]["density"] == 0.5 and record["stats"]["counts"]["merged"] == 51
    assert (record["config"]["weight"], record["config"]["density"]) == (0.5, 0.5)  # the values used, defaults included
    data = json.loads(cli("merge", "--reasoning", reasoning, "--vlm", vlm, "-o", tmp_path / "n", "--method", "layer-swap", "--layers", "3", "--json").stdout)
    assert data["counts"]["merged"] == 12 and data["counts"]["vision"] == 30


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--method", "task-arithmetic", "--density", "0.5"], ["density: is not used by task-arithmetic", "ties, dare-linear, dare-ties"]),
        (["--method", "linear", "--seed", "1"], ["seed: is not used by linear"]),
        (["--method", "ties", "--density", "1.5"], ["density: must be in (0, 1]"]),
        (["--method", "linear", "--weight", "nan"], ["weight: must be a finite number, got nan"]),
        (["--method", "dare-ties", "--weight", "inf"], ["weight: must be a finite number, got inf"]),
        (["--method", "layer-swap"], ["layers: layer-swap needs the decoder layers to swap", "--layers 14-27"]),
        (["--method", "layer-swap", "--layers", "1", "--modules", "embed"], ["decoder-layer selection 'embed; layers 1' matched nothing"]),
        (["--method", "ties", "--modules", "re:nothing"], ["pattern 're:nothing' matched nothing", "available: attn ("]),
    ],
)
def test_cli_bad_input_leaves_nothing(cli, tmp_path, vlm, reasoning, args, fragments):
    result = cli("merge", "--reasoning", reasoning, "--vlm", vlm, "-o", tmp_path / "out", *args)
    assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_two_models_for_layer_swap_and_an_existing_output(cli, tmp_path, vlm, reasoning):
    result = cli("merge", "--reasoning", reasoning, "--reasoning", reasoning, "--vlm", vlm, "-o", tmp_path / "o", "--method", "layer-swap", "--layers", "1")
    assert_one_line_error(result, "layer-swap takes exactly one reasoning model, got 2")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("merge", "--reasoning", reasoning, "--vlm", vlm, "-o", out, "--method", "linear")
    assert_one_line_error(result, "already exists and is not empty", "--overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ["o"] and [p.name for p in out.iterdir()] == ["keep.txt"]
