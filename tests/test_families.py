"""Every VLM family surgeon claims (beyond the layouts of test_layout.py), each with a matching
text LLM, built tiny and random from transformers configs: ``inspect`` places every tensor,
``prior`` pairs exactly the language model's attn+mlp tensors and equals θ_LLM − θ_VLM (checked
against both models loaded by transformers), ``merge`` loads and runs, ``inject-iada`` keeps the
base model's logits, and DRIFT biases what the prior covers (fused MoE experts included)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import logits
from safetensors.torch import load_file, save_file

from surgeon.demo import tiny

FAMILIES = sorted(tiny.PARTNERS)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """family -> (VLM folder, text LLM folder), built once."""
    root = tmp_path_factory.mktemp("families")
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            partner, text = tiny.PARTNERS[family]
            made[family] = (tiny.build(family, root / family, **text), tiny.build(partner, root / f"{family}-llm", seed=1, **text))
        return made[family]

    return get


def _auto(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(folder)
    name = (cfg.architectures or [""])[0]
    return AutoModelForCausalLM if name.endswith("ForCausalLM") else AutoModelForImageTextToText


def _memory_lm(folder: Path) -> dict[str, torch.Tensor]:
    """The language model's parameters as transformers loads them, by LM-relative name; experts
    that transformers fuses in memory also under their per-expert names (gate and up are the two
    halves of gate_up_proj[e], gate first). The library and the remote-code file find the same decoder."""

    from surgeon.anatomy.decoder import language_model, lm_parameters
    from surgeon.modules.modeling_surgeon import decoder_of

    model = _auto(folder).from_pretrained(folder)
    assert language_model(model) is decoder_of(model)[0]
    out = {name: p.detach().clone() for name, p in lm_parameters(model, buffers=True)}
    for name in [n for n in out if n.endswith("experts.gate_up_proj")]:
        base, fused, down = name.rsplit(".", 1)[0], out[name], out[name.replace("gate_up_proj", "down_proj")]
        f = fused.shape[1] // 2
        for e in range(fused.shape[0]):
            out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = fused[e, :f], fused[e, f:]
            out[f"{base}.{e}.down_proj.weight"] = down[e]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_places_every_tensor(cli, pair, family):
    vlm, llm = pair(family)
    report = json.loads(cli("inspect", vlm, "--json").stdout)
    text = json.loads(cli("inspect", llm, "--json").stdout)
    params = report["params"]
    assert params["other"] == 0 and params["vision"] > 0, params
    assert report["num_layers"] == text["num_layers"], (report["lm_prefix"], report["num_layers"])
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    extra = 0
    if family == "mllama":  # its cross-attention layers and 8 extra embedding rows are language model too
        tensors = load_file(str(vlm / "model.safetensors"))
        extra = sum(t.numel() for n, t in tensors.items() if ".layers.1." in n and "language_model" in n) + 8 * hidden
    lm = params["language_model"] - extra
    assert lm in (text["params"]["language_model"], text["params"]["language_model"] - vocab * hidden), (lm, text["params"])


@pytest.mark.parametrize("family", FAMILIES)
def test_prior_pairs_exactly_the_selected_lm_tensors_and_equals_llm_minus_vlm(pair, family, tmp_path):
    from surgeon.anatomy.families import family as family_of
    from surgeon.drift.prior import PriorConfig, compute_prior, open_prior

    vlm, llm = pair(family)
    result = compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(tmp_path / "prior")))
    theirs, ours = _memory_lm(llm), _memory_lm(vlm)
    with open_prior(tmp_path / "prior") as p:
        got = {p.relative(n): n for n in p.names}
        # every attn/mlp tensor of the VLM's language model, as stored (fused or per expert)
        stored = {r for r in ours if re.search(r"experts\.(\d+\.|gate_up_proj$|down_proj$)", r) is None or r in got}
        selected = {rel for rel in stored if family_of(rel) in ("attn", "mlp")}
        assert set(got) == selected, sorted(set(got) ^ selected)[:6]
        for rel, name in got.items():
            delta = p.read(name)
            if delta.shape != ours[rel].shape:  # a fused expert tensor stored in the other orientation
                delta = delta.transpose(1, 2)
            assert torch.allclose(delta, theirs[rel].float() - ours[rel].float(), atol=1e-6), rel
    assert result.counts["selected"] == len(selected)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_loads_and_runs_and_iada_keeps_the_logits(pair, family, tmp_path):
    import surgeon
    from surgeon.modules.iada import IadaConfig, inject_iada
    from surgeon.merge.engine import MergeConfig, merge_models

    vlm, llm = pair(family)
    auto = _auto(vlm)
    ids = {"input_ids": torch.randint(20, 400, (2, 9))}
    merge_models(MergeConfig(reasoning=(str(llm),), vlm=str(vlm), output=str(tmp_path / "merged"), method="task-arithmetic"))
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    assert torch.isfinite(logits(merged, **ids)).all()
    base = auto.from_pretrained(vlm).eval()
    layers = json.loads((vlm / "config.json").read_text())
    block = 1 if family == "video_llava" else 2  # its language model has one layer
    inject_iada(str(vlm), tmp_path / "iada", IadaConfig(block_size=block))
    injected = surgeon.load_model(tmp_path / "iada").eval()
    assert torch.equal(logits(injected, **ids), logits(base, **ids)), layers.get("model_type")


def _transposed_experts(src: Path, dst: Path) -> Path:
    """The VLM with its fused experts saved as the released Qwen3-VL-MoE files store them:
    gate_up_proj [E, d, 2f] and down_proj [E, f, d] (transformers loads both orientations)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, str(dst / "model.safetensors"), {"format": "pt"})
    return dst


@pytest.mark.parametrize("orientation", ["memory", "released"])
def test_fused_moe_experts_pair_with_per_expert_ones_and_drift_biases_them(pair, tmp_path, orientation):
    from surgeon.drift.bias import Drift
    from surgeon.drift.prior import PriorConfig, compute_prior

    vlm, llm = pair("qwen3_vl_moe")
    if orientation == "released":
        vlm = _transposed_experts(vlm, tmp_path / "released")
    compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(tmp_path / "prior")))
    prior = load_file(str(tmp_path / "prior" / "model.safetensors"))
    fused = [n for n in prior if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 8  # 4 layers × (gate_up, down)
    want = load_file(str(vlm / "model.safetensors"))
    assert all(prior[n].shape == want[n].shape for n in fused)  # stored under the VLM's names and shapes

    model = _auto(vlm).from_pretrained(vlm)
    drift = Drift.from_prior(model, tmp_path / "prior", normalize=False)
    theirs, ours = _memory_lm(llm), _memory_lm(vlm)
    by_name = dict(zip(drift.names, drift.deltas))
    for rel in ("layers.0.mlp.experts.gate_up_proj", "layers.3.mlp.experts.down_proj"):
        assert torch.allclose(by_name[rel].float(), theirs[rel] - ours[rel], atol=1e-6), rel


def test_experts_that_cannot_be_paired_stop_with_what_is_unpaired(pair, tiny_models, tmp_path):
    from surgeon.errors import AlignmentError
    from surgeon.drift.prior import PriorConfig, compute_prior

    vlm, _ = pair("qwen3_vl_moe")
    other = tiny.build("qwen3_moe", tmp_path / "narrow-experts", seed=1, moe_intermediate_size=8)  # experts of another width
    with pytest.raises(AlignmentError, match=r"selected mlp tensor\(s\) of the VLM and .* of the reasoning model have no counterpart"):
        compute_prior(PriorConfig(reasoning=str(other), vlm=str(vlm), output=str(tmp_path / "p")))
    assert not (tmp_path / "p").exists()


def test_cross_attention_layers_are_left_out_and_counted(pair, tmp_path):
    """Llama-3.2-Vision interleaves cross-attention layers: the self-attention layers pair with
    the Llama text model's, the cross-attention ones stay the VLM's own."""
    from surgeon.drift.prior import PriorConfig, compute_prior

    vlm, llm = pair("mllama")
    result = compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(tmp_path / "prior")))
    assert result.counts["unmatched_lm"] > 0 and result.counts["llm_only"] == 0
    record = json.loads((tmp_path / "prior" / "surgeon.json").read_text())
    relatives = {t["relative"] for t in record["stats"]["tensors"].values()}
    assert "layers.1.self_attn.q_proj.weight" in relatives  # the VLM's layer 2 (its layer 1 is cross-attention)
    assert record["stats"]["tensors"]["language_model.model.layers.2.self_attn.q_proj.weight"]["relative"] == "layers.1.self_attn.q_proj.weight"
    assert not any(r.startswith("cross_layers.") for r in relatives)


_TABLE_ROWS = {"lfm2_vl": "LFM2-VL", "phi4_multimodal": "Phi-4-multimodal", "qwen3_vl_moe": "Qwen3-VL-MoE", "kimi_k25": "Kimi-K2.5"}


def _documented_presets(family: str) -> dict[str, set[str]]:
    """The module names docs/methods.md §8's preset table gives ``family`` (braces expanded)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "methods.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "`" in line]
    label = _TABLE_ROWS.get(family, "standard decoders")
    (row,) = [r for r in rows if label in r[0]]

    def names(cell: str) -> set[str]:
        out = set()
        for code in re.findall(r"`([^`]+)`", cell):
            m = re.search(r"\{([^}]*)\}", code)
            for option in m.group(1).split(",") if m else [""]:
                out.add((code[: m.start()] + option + code[m.end() :] if m else code).rsplit(".", 1)[-1])
        return out

    return {"attn_proj": names(row[1]), "gate_up": names(row[2])}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_preset_table_in_the_methods_page_says_what_the_presets_select(pair, family):
    from surgeon.anatomy.families import Selection
    from surgeon.anatomy.layout import detect_layout
    from surgeon.io.checkpoint import Checkpoint

    vlm, _ = pair(family)
    checkpoint = Checkpoint(vlm)
    layout = detect_layout(list(checkpoint.tensors), checkpoint.config)
    relative = [r for r in (layout.lm_relative(n) for n in checkpoint.tensors) if r]
    documented = _documented_presets(family)
    for preset, names in documented.items():
        selected = {r.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1] for r in relative if Selection((preset,)).accepts(r)}
        assert selected == names, (family, preset)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_swap_probe_runs_on_every_family_and_leaves_the_model_as_it_was(pair, family, shapes_data, tmp_path):
    from surgeon.evaluation.layers import ProbeConfig, probe_layers

    vlm, llm = pair(family)
    data = shapes_data("trl")
    text = [line for line in data.read_text().splitlines() if '"image"' not in line][:2]
    (tmp_path / "text.jsonl").write_text("\n".join(text) + "\n")
    config = ProbeConfig(vlm=str(vlm), reasoning=str(llm), data=str(tmp_path / "text.jsonl"), probes="swap", accuracy=False)
    result = probe_layers(config)
    assert [row["layer"] for row in result.layers] == list(range(result.num_layers))
    assert all(torch.isfinite(torch.tensor(row["swap_loss"])) for row in result.layers)
    assert any(row["swap_loss"] != result.baseline["text"]["loss"] for row in result.layers)  # a random partner moves the loss
