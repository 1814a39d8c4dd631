"""``surgeon inject-iada``: the folder it writes, round trips (surgeon and trust_remote_code), bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import transformers
import torch
from helpers import assert_one_line_error
from safetensors.torch import load_file

import surgeon
from surgeon import load_model
from surgeon.modules.iada import SHARD, IadaConfig, add_iada, inject_iada
from surgeon.modules.folders import module_parameters


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_inject_writes_a_standard_model_folder(cli, vlm, tmp_path):
    before = snapshot(vlm)
    out = tmp_path / "vlm-iada"
    result = cli("inject-iada", vlm, "-o", out, "--block-size", "2")
    assert result.exit_code == 0, result.output
    assert "added parameters: 2,176" in result.stdout  # 2 boundaries × (4·64·4 + 64)
    assert snapshot(vlm) == before
    linked = "model-00001-of-00001.safetensors"  # not model.safetensors, which transformers would read instead of the index
    assert os.stat(out / linked).st_ino == os.stat(vlm / "model.safetensors").st_ino  # hard link
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {f for n, f in index.items() if n.startswith("surgeon.iada.")} == {SHARD}
    assert {f for n, f in index.items() if not n.startswith("surgeon.")} == {linked}
    _, info = load_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the IADA shard is read
    assert set(load_file(out / SHARD)) == {n for n in index if n.startswith("surgeon.iada.")}
    config = json.loads((out / "config.json").read_text())
    assert config["surgeon"]["iada"]["boundaries"] == [2, 4] and config["surgeon"]["iada"]["rank"] == 4
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_surgeon.SurgeonQwen2_5_VLForConditionalGeneration"
    # a name of its own: an engine that picks its class by name (vLLM, SGLang) cannot take it for the base
    assert config["architectures"] == ["SurgeonQwen2_5_VLForConditionalGeneration"]
    assert not hasattr(transformers, config["architectures"][0])
    shipped = Path(surgeon.__file__).parent / "modules" / "modeling_surgeon.py"
    assert (out / "modeling_surgeon.py").read_bytes() == shipped.read_bytes()
    record = json.loads((out / "surgeon.json").read_text())
    assert record["artifact"] == "model+remote-code" and record["config"]["block_size"] == 2
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()


def test_a_folder_of_relative_symlinks_like_the_hub_cache(cli, vlm, tmp_path):
    """Hub snapshots are relative links into ``blobs/``: the output links the files, not the links."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in vlm.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", f.name))
    out = tmp_path / "out" / "vlm-iada"
    assert cli("inject-iada", snapshot, "-o", out, "--block-size", "2").exit_code == 0
    assert not any(p.is_symlink() for p in out.iterdir())
    _, info = load_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_in_memory_injection_matches_the_written_folder(vlm, tmp_path):
    """One source of truth: add_iada and inject_iada create the same initial weights."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "vlm-iada"
    inject_iada(str(vlm), out, IadaConfig(block_size=2, seed=5))
    loaded = module_parameters(load_model(out))
    model = AutoModelForImageTextToText.from_pretrained(vlm)
    add_iada(model, IadaConfig(block_size=2, seed=5))
    made = module_parameters(model)
    assert loaded.keys() == made.keys()
    assert all(torch.equal(loaded[n], made[n]) and made[n].dtype == torch.float32 for n in made)


# ------------------------------------------------------------------------ round trip, remote code


# -------------------------------------------------------------------------- options and bad input
def test_dry_run_reads_config_json_alone(cli, vlm, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_bytes((vlm / "config.json").read_bytes())
    result = cli("inject-iada", folder, "--dry-run", "--json", "--block-size", "1", "--depth", "2", "--mode", "fixed")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert [(b["after_layers"], b["sources"]) for b in plan["boundaries"]] == [(1, [0]), (2, [0, 1]), (3, [1, 2]), (4, [2, 3])]
    assert plan["params"] == 4 * 64 + (1 + 2 + 2 + 2)  # gates + fixed depth logits
    text = cli("inject-iada", folder, "--dry-run", "--block-size", "2")
    assert "added parameters: 2,176" in text.stdout and "dry run: nothing written" in text.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config-only"]


def test_dry_run_fills_in_default_sizes(cli, tiny_models, tmp_path):
    """LLaVA-style config.json files often omit the text model's default sizes (LlamaConfig: 32 x 4096)."""
    config = json.loads((tiny_models("llava") / "config.json").read_text())
    text = config["text_config"]
    for key in ("hidden_size", "num_hidden_layers", "layer_types", "intermediate_size"):
        text.pop(key, None)
    text["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    plan = json.loads(cli("inject-iada", tmp_path, "--dry-run", "--json").stdout)["plan"]
    assert (plan["num_layers"], plan["hidden_size"]) == (32, 4096)
    assert plan["params"] == 4 * (4 * 4096 * 4 + 4096) and plan["visual_token_ids"] == [config["image_token_index"]]


def test_reinjecting_needs_replace(cli, vlm, tmp_path):
    import shutil

    shutil.copytree(vlm, tmp_path / "m")
    assert cli("inject-iada", tmp_path / "m", "--block-size", "2").exit_code == 0
    first = tmp_path / "m-iada"  # the default output: a sibling of MODEL
    assert_one_line_error(cli("inject-iada", first, "-o", tmp_path / "b", "--block-size", "2"), "already has IADA blocks", "--replace")
    assert not (tmp_path / "b").exists()
    result = cli("inject-iada", first, "-o", tmp_path / "b", "--block-size", "4", "--rank", "2", "--replace")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["surgeon"]["iada"]["boundaries"] == [4] and config["surgeon"]["iada"]["rank"] == 2
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(n for n in index if n.startswith("surgeon.")) == sorted(load_file(tmp_path / "b" / SHARD))
    model = load_model(tmp_path / "b")
    assert model.surgeon.iada.blocks[0].down.shape == (2, 2, 64) and len(model.surgeon.iada.blocks) == 1


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--block-size", "5"], ["block_size: 5 leaves no boundary in a 4-layer decoder", "at most 4"]),
        (["--rank", "0"], ["rank: must be at least 1"]),
        (["--depth", "0"], ["depth: must be at least 1"]),
    ],
)
def test_bad_options_give_one_line_and_write_nothing(cli, vlm, tmp_path, args, fragments):
    assert_one_line_error(cli("inject-iada", vlm, "-o", tmp_path / "out", *args), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_give_one_line(cli, vlm, tmp_path):
    assert_one_line_error(cli("inject-iada", tmp_path / "nope"), "no such folder")
    assert_one_line_error(cli("inject-iada", tmp_path / "nope", "--dry-run"), "no such folder")
    before = snapshot(vlm)
    assert_one_line_error(cli("inject-iada", vlm, "-o", vlm, "--block-size", "2"), "is the input", "choose an output outside the inputs")
    assert snapshot(vlm) == before and not [p for p in vlm.parent.iterdir() if "surgeon-tmp" in p.name]
