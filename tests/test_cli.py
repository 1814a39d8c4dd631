"""The command line through its real entry point: help, version, inspect, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, run_without_torch

from surgeon import __version__
from surgeon.cli import main


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_help_ends_with_a_runnable_example(cli, name):
    result = cli(name, "--help")
    assert result.exit_code == 0
    tail = result.output.rstrip().splitlines()
    example_at = max(i for i, line in enumerate(tail) if line.strip() == "Example:")
    assert all(line.strip().startswith("surgeon ") for line in tail[example_at + 1 :])


def test_inspect_text_and_json(cli, vlm):
    result = cli("inspect", vlm)
    assert result.exit_code == 0, result.output
    for fragment in ("Qwen2_5_VLForConditionalGeneration", "model.layers.* (4 layers)", "language model", "projector"):
        assert fragment in result.stdout
    data = json.loads(cli("inspect", vlm, "--json").stdout)
    assert data["num_layers"] == 4 and data["hidden_size"] == 64 and data["num_key_value_heads"] == 2
    assert data["head_dim"] == 16 and data["vocab_size"] == 512 and data["dtype"] == "F32"
    assert data["params"]["total"] == sum(v for k, v in data["params"].items() if k != "total")
    assert data["placeholder_tokens"]["image"] == json.loads((vlm / "config.json").read_text())["image_token_id"]


# ---------------------------------------------------------------- bad input: one line, exit 1


@pytest.fixture
def broken(tmp_path, vlm):
    """Make a damaged copy of the tiny VLM; returns a function ``kind -> folder``."""

    def make(kind: str):
        folder = tmp_path / kind
        shutil.copytree(vlm, folder)
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        if kind == "no-weights":
            weights.unlink()
        elif kind == "corrupt-header":
            weights.write_bytes(data[:8] + b"\x00garbage" + data[16:])
        elif kind == "truncated":
            weights.write_bytes(data[: len(data) - 1000])
        elif kind == "missing-shard":
            weights.rename(folder / "model-00001-of-00002.safetensors")
            index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        elif kind == "pickle-only":
            weights.unlink()
            (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        return folder

    return make


@pytest.mark.parametrize(
    "kind,fragments",
    [
        ("no-weights", ["has no safetensors weights"]),
        ("corrupt-header", ["model.safetensors has a corrupt header", "download or copy"]),
        ("truncated", ["model.safetensors is truncated"]),
        ("missing-shard", ["names 1 shard(s) that are missing", "model-00002-of-00002.safetensors"]),
        ("pickle-only", ["holds only pickle weights (pytorch_model.bin)", "never unpickles"]),
    ],
)
def test_damaged_checkpoints_give_one_line(cli, broken, kind, fragments):
    folder = broken(kind)
    before = sorted(p.name for p in folder.iterdir())
    result = cli("inspect", folder)
    assert_one_line_error(result, *fragments)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_missing_folder(cli, tmp_path):
    assert_one_line_error(cli("inspect", tmp_path / "nope"), "no such folder")
    assert_one_line_error(cli("inspect", "acme/not-cached"), "not in the Hub cache")
    assert_one_line_error(cli("inspect", "acme/not-cached", "--revision", "v9"), "acme/not-cached at revision v9")
    assert_one_line_error(cli("inspect", ""), "the path is empty")


def test_inspect_needs_no_torch(cli, vlm, tiny_models):
    """With torch (and the libraries built on it) unimportable, ``inspect`` reports what it reports
    with them, from config.json and the safetensors headers alone."""
    for folder in (vlm, tiny_models("qwen3_vl_moe")):
        blocked = run_without_torch(["inspect", folder, "--json"])
        assert blocked.returncode == 0, blocked.stderr[-2000:]
        assert json.loads(blocked.stdout) == json.loads(cli("inspect", folder, "--json").stdout)
    assert run_without_torch(["inspect", folder]).returncode == 0  # the tables too


def test_inspect_fills_sizes_a_config_leaves_to_transformers_defaults(cli, tmp_path, tiny_models):
    """LLaVA-1.5/1.6 configs name only what differs from LlamaConfig's defaults in text_config."""
    folder = shutil.copytree(tiny_models("llava"), tmp_path / "llava")
    config = json.loads((folder / "config.json").read_text())
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        config["text_config"].pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    data = json.loads(cli("inspect", folder, "--json").stdout)
    # LlamaConfig's defaults (a 7B Llama), as transformers itself would build this model
    assert (data["hidden_size"], data["num_attention_heads"], data["num_key_value_heads"], data["head_dim"]) == (4096, 32, 32, 128)


def test_inspect_shows_quantized_weights(cli, tmp_path, vlm):
    folder = shutil.copytree(vlm, tmp_path / "fp8")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (folder / "config.json").write_text(json.dumps(config))
    assert "quantized (fp8)" in cli("inspect", folder).stdout
    assert json.loads(cli("inspect", folder, "--json").stdout)["quantization"] == "fp8"


def test_existing_output_folder_is_refused(cli, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    assert_one_line_error(cli("demo", "--workdir", work), "already exists and is not empty", "--overwrite")
    assert [p.name for p in work.iterdir()] == ["keep.txt"]


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_DEBUG", "1")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "CheckpointError"


def test_usage_errors_stay_click_exit_2(cli):
    assert cli("inspect").exit_code == 2
    assert cli("no-such-command").exit_code == 2
