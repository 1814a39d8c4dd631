"""``surgeon train --dry-run``: the memory plan from config.json alone, on the real shapes of
Qwen2.5-VL-7B (its config.json, no weights), and the check that stops a run that cannot fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line_error

CONFIG_7B = Path(__file__).parent / "configs" / "qwen2_5_vl_7b.json"
SHARDED = ("master", "gradients", "optimizer", "delta")


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory) -> Path:
    """A folder holding only Qwen2.5-VL-7B-Instruct's config.json."""
    folder = tmp_path_factory.mktemp("qwen2.5-vl-7b")
    shutil.copy(CONFIG_7B, folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def prior_7b(tmp_path_factory) -> Path:
    """A prior folder's surgeon.json for the 7B's attn+mlp tensors in bf16 (what --dry-run reads)."""
    folder = tmp_path_factory.mktemp("prior-7b")
    leaves = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"self_attn.{p}_proj.bias" for p in "qkv"]
    leaves += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    tensors = {f"model.layers.{i}.{leaf}": {"relative": f"layers.{i}.{leaf}", "vlm_norm": 1.0} for i in range(28) for leaf in leaves}
    record = {"artifact": "prior", "config": {"dtype": "bf16"}, "stats": {"tensors": tensors}}
    (folder / "surgeon.json").write_text(json.dumps(record))
    return folder


def plan(cli, *args) -> dict:
    """A GPU plan (a --gpu-memory says the run is for a GPU; without one, this CPU machine plans for its CPU)."""
    gpu = [] if "--gpu-memory" in args else ["--gpu-memory", "10TB"]
    result = cli("train", *args, *gpu, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_full_fine_tuning_of_the_7b_does_not_fit_80gb_on_one_process(cli, qwen7b):
    one = plan(cli, qwen7b, "--full", "--gpu-memory", "80GB")
    assert one["parameters"]["total"] == 8_292_166_656 and one["parameters"]["trained"] == 7_615_616_512
    parts = one["parts"]
    assert set(parts) == {"weights", "master", "gradients", "optimizer", "delta", "copies", "activations", "runtime"}
    trained = one["parameters"]["trained"]
    assert parts["master"] == parts["gradients"] == 4 * trained and parts["optimizer"] == 8 * trained  # fp32 master, AdamW
    assert parts["weights"] == 2 * one["parameters"]["frozen"]  # the frozen vision tower in bf16
    assert one["per_process_bytes"] == sum(parts.values()) > 80e9 and one["fits"] is False
    text = cli("train", qwen7b, "--full", "--dry-run", "--gpu-memory", "80GB")
    assert "does NOT fit 80.0 GB" in text.stdout and "nothing loaded or written" in text.stdout


def test_fsdp_on_8_processes_shards_the_trained_state_and_delta(cli, qwen7b, prior_7b):
    one = plan(cli, qwen7b, "--full", "--prior", prior_7b)
    eight = plan(cli, qwen7b, "--full", "--prior", prior_7b, "--fsdp", "--num-processes", "8", "--gpu-memory", "80GB")
    assert eight["sharded"] is True and eight["fits"] is True
    biased = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3584 + 2 * 512 + 3 * 3584 * 18944)
    assert one["parts"]["delta"] == 2 * biased  # bf16 Δ
    for part in SHARDED:
        whole, shard = one["parts"][part], eight["parts"][part]
        assert whole / 8 <= shard <= whole / 8 * 1.001 + 8 * 152064 * 4, (part, whole, shard)  # rows round up
    assert eight["parts"]["weights"] == one["parts"]["weights"]  # the vision tower is replicated
    # a plan for one process with --fsdp is an unsharded plan
    assert plan(cli, qwen7b, "--full", "--fsdp")["parts"] == plan(cli, qwen7b, "--full")["parts"]


def test_lora_and_precision_options_change_the_counts_exactly(cli, qwen7b):
    lora = plan(cli, qwen7b, "--lora-rank", "16", "--param-dtype", "bf16")
    assert lora["parameters"]["trained"] == 28 * 16 * (2 * 7168 + 2 * 4096 + 3 * 22528)  # r·(in+out) per projection
    assert lora["parts"]["master"] == 2 * lora["parameters"]["trained"] and lora["precision"]["trained"] == "bfloat16"
    fp32 = plan(cli, qwen7b, "--mixed-precision", "no")
    assert fp32["parts"]["weights"] == 4 * fp32["parameters"]["frozen"] and fp32["parts"]["copies"] == 0
    short = plan(cli, qwen7b, "--max-length", "512")["parts"]["activations"]
    checkpointed = plan(cli, qwen7b, "--max-length", "512", "--gradient-checkpointing")["parts"]["activations"]
    assert checkpointed < short < plan(cli, qwen7b)["parts"]["activations"]


def test_a_run_whose_plan_does_not_fit_stops_before_loading(cli, vlm, shapes_data, tmp_path):
    result = cli("train", vlm, "--data", shapes_data("trl"), "-o", tmp_path / "out", "--gpu-memory", "1MB")
    assert_one_line_error(result, "memory:", "per process", "budget (--gpu-memory)", "--dry-run")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoints").exists()


def test_training_needs_data_and_output_unless_dry_run(cli, vlm, tmp_path):
    assert_one_line_error(cli("train", vlm, "-o", tmp_path / "out"), "data:", "--dry-run")
    assert_one_line_error(cli("train", vlm, "--data", "x.jsonl"), "output:")


def test_without_a_gpu_the_plan_is_for_the_cpu_in_fp32_with_the_runtime_measured(cli, qwen7b):
    import os

    cpu = json.loads(cli("train", qwen7b, "--full", "--dry-run", "--json").stdout)
    gpu = plan(cli, qwen7b, "--full")
    assert cpu["device"] == "cpu" and gpu["device"] == "cuda"
    assert cpu["precision"]["compute"] == "float32" and gpu["precision"]["compute"] == "bfloat16"
    with open("/proc/self/statm") as f:
        here = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert 0.5 * here <= cpu["parts"]["runtime"] <= 2 * here  # this process's own memory, not an allowance
    assert cpu["parts"]["weights"] == 2 * gpu["parts"]["weights"]  # the frozen tower in fp32, not bf16
    assert "memory plan for the CPU" in cli("train", qwen7b, "--full", "--dry-run").stdout
