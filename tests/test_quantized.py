"""FP8 and INT4 checkpoints as inputs: the readers against independent references (and against
compressed-tensors' own unpacking), inspect's report, prior and merge equal to dequantise-then-op,
``merge --requantize`` writing the scheme back, DRIFT from a prior of quantized inputs, and one
line for what cannot be read."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error
from safetensors.torch import load_file, save_file

from surgeon.demo import tiny
from surgeon.demo.quantized import save_compressed, save_fp8

BLOCK = (16, 24)  # neither divides the tiny model's 64×128 / 128×64 weights evenly in both axes


@pytest.fixture(scope="module")
def models(vlm, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    llm = tiny.build_reasoning_llm(vlm, root / "llm")
    return {
        "vlm": vlm, "llm": llm,
        "vlm-fp8": save_fp8(vlm, root / "vlm-fp8", block=BLOCK), "llm-fp8": save_fp8(llm, root / "llm-fp8", block=BLOCK),
        "llm-fp8-tensor": save_fp8(llm, root / "llm-fp8-tensor", block=None),
        "llm-int4": save_compressed(llm, root / "llm-int4", bits=4, group=32, symmetric=True),
        "llm-int4-asym": save_compressed(llm, root / "llm-int4-asym", bits=4, group=32, symmetric=False),
        "llm-ct-fp8": save_compressed(llm, root / "llm-ct-fp8", fmt="float-quantized"),
    }  # fmt: skip


def _nibbles(words: torch.Tensor, count: int) -> torch.Tensor:
    """Reference unpacking, one value at a time: value k of a word is bits 4k..4k+3, minus 8."""
    rows = []
    for row in words.tolist():
        values = []
        for word in row:
            word &= 0xFFFFFFFF
            values += [((word >> (4 * k)) & 0xF) - 8 for k in range(8)]
        rows.append(values[:count])
    return torch.tensor(rows, dtype=torch.float32)


def _reference(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized folder dequantised here, by the formulas of each format."""
    raw = load_file(folder / "model.safetensors")
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    out = {}
    for name, t in raw.items():
        if name.endswith(("_scale_inv", "_scale", "_shape", "_zero_point")):
            continue
        if name.endswith("_scale_inv") or name + "_scale_inv" in raw:
            s = raw[name + "_scale_inv"]
            block = quant.get("weight_block_size") or list(t.shape)
            out[name] = t.float() * torch.kron(s.reshape(math.ceil(t.shape[0] / block[0]), -1), torch.ones(*block))[: t.shape[0], : t.shape[1]]
        elif name + "_scale" in raw:  # compressed-tensors float8, per row
            out[name] = t.float() * raw[name + "_scale"].float()
        elif name.endswith(".weight_packed"):
            base = name.removesuffix("_packed")
            rows, cols = raw[base + "_shape"].tolist()
            q = _nibbles(t, cols)
            group = quant["config_groups"]["group_0"]["weights"]["group_size"]
            scale = raw[base + "_scale"].float().repeat_interleave(group, 1)[:, :cols]
            if base + "_zero_point" in raw:
                zero = _nibbles(raw[base + "_zero_point"].t().contiguous(), rows).t()
                q = q - zero.repeat_interleave(group, 1)[:, :cols]
            out[base] = q * scale
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("kind", ["vlm-fp8", "llm-fp8-tensor", "llm-int4", "llm-int4-asym", "llm-ct-fp8"])
def test_readers_equal_the_formulas_of_each_format(models, kind):
    from surgeon.hub.sources import open_checkpoint
    from surgeon.io.quantized import dequantized

    ref = _reference(models[kind])
    with open_checkpoint(models[kind]) as ckpt:
        view = dequantized(ckpt)
        assert set(view.tensors) == set(ref)
        assert view.quantized and all(view.tensors[n].shape == tuple(ref[n].shape) for n in view.quantized)
        for name in ref:
            torch.testing.assert_close(view.read(name).float(), ref[name].float(), rtol=0, atol=0)
        name = next(iter(view.quantized))  # rows from the middle, across a block edge
        torch.testing.assert_close(view.read(name, 7, 13), ref[name][13:20], rtol=0, atol=0)


def test_int4_unpacking_equals_compressed_tensors(models):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from surgeon.io.quantized import unpack_int32

    raw = load_file(models["llm-int4-asym"] / "model.safetensors")
    packed = next(n for n in raw if n.endswith(".weight_packed"))
    shape = torch.Size(raw[packed.replace("_packed", "_shape")].tolist())
    theirs = helpers.unpack_from_int32(raw[packed], 4, shape)
    assert torch.equal(unpack_int32(raw[packed], 4, shape[1]).to(torch.int8), theirs)
    zero = raw[packed.replace("_packed", "_zero_point")]
    zshape = torch.Size([shape[0], raw[packed.replace("_packed", "_scale")].shape[1]])
    theirs = helpers.unpack_from_int32(zero, 4, zshape, packed_dim=0)
    assert torch.equal(unpack_int32(zero.t(), 4, zshape[0]).t().to(torch.int8), theirs)


def _as_plain(folder: Path, dst: Path) -> Path:
    """The reference dequantised values saved as an fp32 folder without quantization_config."""
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    save_file({k: v.float().contiguous() for k, v in _reference(folder).items()}, dst / "model.safetensors", {"format": "pt"})
    return dst


@pytest.mark.parametrize("vlm_kind, llm_kind", [("vlm-fp8", "llm-fp8"), ("vlm", "llm-int4-asym"), ("vlm-fp8", "llm-ct-fp8")])
def test_prior_of_quantized_inputs_equals_dequantise_then_subtract(cli, models, tmp_path, vlm_kind, llm_kind):
    vlm = models[vlm_kind] if vlm_kind == "vlm" else _as_plain(models[vlm_kind], tmp_path / "vlm-plain")
    llm = _as_plain(models[llm_kind], tmp_path / "llm-plain")
    ran = cli("prior", "--reasoning", models[llm_kind], "--vlm", models[vlm_kind], "-o", tmp_path / "q", "--dtype", "fp32")
    assert ran.exit_code == 0, ran.output
    assert cli("prior", "--reasoning", llm, "--vlm", vlm, "-o", tmp_path / "p", "--dtype", "fp32").exit_code == 0
    ours, theirs = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "p" / "model.safetensors")
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7)


def test_a_prior_of_fp8_inputs_is_bf16_by_default_and_trains_with_drift(cli, models, data, tmp_path):
    ran = cli("prior", "--reasoning", models["llm-fp8"], "--vlm", models["vlm-fp8"], "-o", tmp_path / "prior")
    assert ran.exit_code == 0, ran.output
    header = json.loads((tmp_path / "prior" / "surgeon.json").read_text())
    assert header["stats"]["dtype"] == "F32"  # the tiny models are fp32: the VLM's unquantized dtype
    trained = cli("train", models["vlm"], "--data", data, "-o", tmp_path / "run", "--full", "--prior", tmp_path / "prior", "--max-steps", "1", "--batch-size", "2")
    assert trained.exit_code == 0, trained.output
    assert json.loads((tmp_path / "run" / "surgeon.json").read_text())["stats"]["drift"]["tensors"] > 0


def test_merge_of_an_fp8_vlm_is_unquantized_by_default_and_loads(cli, models, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "merged"
    ran = cli("merge", "--reasoning", models["llm-int4"], "--vlm", models["vlm-fp8"], "--method", "task-arithmetic", "--layers", "1", "-o", out)
    assert ran.exit_code == 0, ran.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    vlm_plain, llm_plain = _as_plain(models["vlm-fp8"], tmp_path / "v"), _as_plain(models["llm-int4"], tmp_path / "l")
    assert cli("merge", "--reasoning", llm_plain, "--vlm", vlm_plain, "--method", "task-arithmetic", "--layers", "1", "-o", tmp_path / "ref").exit_code == 0
    ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert set(ours) == set(theirs) and not any(n.endswith("_scale_inv") for n in ours)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7)
    AutoModelForImageTextToText.from_pretrained(out)  # a plain model folder


def test_merge_requantize_writes_the_fp8_scheme_back(cli, models, tmp_path):
    from surgeon.io.quantized import FP8_MAX

    out = tmp_path / "merged-fp8"
    ran = cli("merge", "--reasoning", models["llm"], "--vlm", models["vlm-fp8"], "--method", "task-arithmetic",
              "--layers", "1", "-o", out, "--requantize")  # fmt: skip
    assert ran.exit_code == 0, ran.output
    config, source = json.loads((out / "config.json").read_text()), json.loads((models["vlm-fp8"] / "config.json").read_text())
    assert config["quantization_config"] == source["quantization_config"]
    ours, before = load_file(out / "model.safetensors"), load_file(models["vlm-fp8"] / "model.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in ours.items()} == {n: (t.dtype, t.shape) for n, t in before.items()}
    unmerged = [n for n in before if ".layers.0." in n or "visual" in n]
    assert unmerged and all(torch.equal(ours[n].view(torch.uint8) if ours[n].dtype == torch.float8_e4m3fn else ours[n],
                                        before[n].view(torch.uint8) if before[n].dtype == torch.float8_e4m3fn else before[n]) for n in unmerged)  # fmt: skip
    # the merged layer: the requantized values are the merge of the values, to within fp8's step in each block
    reference = tmp_path / "ref"
    assert cli("merge", "--reasoning", models["llm"], "--vlm", _as_plain(models["vlm-fp8"], tmp_path / "v"), "--method",
               "task-arithmetic", "--layers", "1", "-o", reference).exit_code == 0  # fmt: skip
    merged = load_file(reference / "model.safetensors")
    got = _reference(out)
    layer = [n for n in ours if ".layers.1." in n and n.endswith("_proj.weight")]
    assert layer
    for name in layer:
        s = ours[name + "_scale_inv"]
        step = torch.kron(s, torch.ones(*BLOCK))[: merged[name].shape[0], : merged[name].shape[1]] * FP8_MAX / 8
        assert bool(((got[name] - merged[name]).abs() <= step * 1.01).all()), name
        assert not torch.equal(ours[name].view(torch.uint8), before[name].view(torch.uint8))


def test_inspect_reports_the_scheme_and_what_stays_unquantized(cli, models):
    shown = json.loads(cli("inspect", models["vlm-fp8"], "--json").stdout)
    q = shown["quantized"]
    assert q["method"] == "fp8" and q["scales"] == [f"blocks of {BLOCK[0]}×{BLOCK[1]}"] and q["quantized_tensors"] == 28
    assert q["not_quantized"]["vision tower and projector"] > 0 and q["not_quantized"]["embeddings"] == 1
    plain = json.loads(cli("inspect", models["vlm"], "--json").stdout)
    assert shown["params"] == plain["params"]  # counted as the logical weights
    text = cli("inspect", models["llm-int4"]).stdout
    assert "quantized" in text and "groups of 32" in text


def _edited(folder: Path, dst: Path, edit) -> Path:
    shutil.copytree(folder, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", {"format": "pt"})
    return dst


def test_bad_quantized_inputs_are_one_line(cli, models, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    missing = _edited(models["llm-fp8"], tmp_path / "missing", lambda t: t.pop(name + "_scale_inv"))
    assert_one_line_error(cli("prior", "--reasoning", missing, "--vlm", models["vlm"], "-o", tmp_path / "o1"), name, "no scale")
    bent = _edited(models["llm-fp8"], tmp_path / "bent", lambda t: t.update({name + "_scale_inv": torch.ones(3, 3)}))
    assert_one_line_error(cli("merge", "--reasoning", bent, "--vlm", models["vlm"], "--method", "linear", "-o", tmp_path / "o2"), name + "_scale_inv", "[3, 3]")
    for method in ("awq", "bitsandbytes", "something-new"):
        folder = shutil.copytree(models["llm"], tmp_path / method)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": method}
        (folder / "config.json").write_text(json.dumps(config))
        assert_one_line_error(cli("prior", "--reasoning", folder, "--vlm", models["vlm"], "-o", tmp_path / "o3"), method, "does not read")
    assert_one_line_error(cli("merge", "--reasoning", models["llm"], "--vlm", models["vlm"], "--method", "linear", "-o", tmp_path / "o4", "--requantize"), "not quantized")
    int4_vlm = save_compressed(models["vlm"], tmp_path / "vlm-int4")
    assert_one_line_error(cli("merge", "--reasoning", models["llm"], "--vlm", int4_vlm, "--method", "linear", "-o", tmp_path / "o5", "--requantize"), "FP8")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_the_fast_float8_cast_is_exact_for_every_code():
    from surgeon.io.quantized import _e4m3_to_float

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = ~torch.isnan(codes.float())
    ours = _e4m3_to_float(codes, torch.empty(256))
    assert torch.equal(ours[finite], codes.float()[finite])
