"""``--config FILE`` on train and merge: YAML options (flags override them) and replaying the
surgeon.json an output records, byte for byte."""

from __future__ import annotations

import json

import pytest
from surgeon.demo import tiny
from helpers import assert_one_line_error

from surgeon.io.provenance import read_record


@pytest.fixture(scope="module")
def reasoning(vlm, tmp_path_factory):
    return tiny.build_reasoning_llm(vlm, tmp_path_factory.mktemp("r1") / "r1", seed=1)


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_a_yaml_file_sets_options_and_flags_override_it(cli, vlm, data, tmp_path):
    (tmp_path / "run.yaml").write_text(
        f"model: {vlm}\ndata: {data}\noutput: {tmp_path / 'from-file'}\nmax-steps: 2\nbatch_size: 2\n"
        "--lr: 1.0e-3\nfull: true\nmodules: [attn, mlp]\nseed: 3\n"
    )
    result = cli("train", "--config", tmp_path / "run.yaml", "--seed", "4")
    assert result.exit_code == 0, result.output
    config = read_record(tmp_path / "from-file")["config"]
    assert (config["max_steps"], config["batch_size"], config["lr"], config["full"]) == (2, 2, 1e-3, True)
    assert config["modules"] == "attn,mlp" and config["seed"] == 4  # the flag wins over the file
    flags = cli("train", vlm, "--data", data, "-o", tmp_path / "from-flags", "--max-steps", "2", "--batch-size", "2",
                "--lr", "1e-3", "--full", "--modules", "attn,mlp", "--seed", "4")  # fmt: skip
    assert flags.exit_code == 0, flags.output
    assert _bytes(tmp_path / "from-file") == _bytes(tmp_path / "from-flags")


def test_replaying_a_train_record_writes_the_same_bytes(cli, vlm, data, tmp_path):
    first = cli("train", vlm, "--data", data, "-o", tmp_path / "a", "--max-steps", "2", "--batch-size", "2",
                "--lr", "1e-2", "--perception-weight", "0.5", "--lora-rank", "4")  # fmt: skip
    assert first.exit_code == 0, first.output
    again = cli("train", "--config", tmp_path / "a" / "surgeon.json", "-o", tmp_path / "b")
    assert again.exit_code == 0, again.output
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b") and _bytes(tmp_path / "a")
    a, b = (read_record(tmp_path / n)["config"] for n in "ab")
    assert {k: v for k, v in a.items() if k != "output"} == {k: v for k, v in b.items() if k != "output"}
    # the recorded output exists: the replay says so instead of overwriting it
    assert_one_line_error(cli("train", "--config", tmp_path / "a" / "surgeon.json"), "already exists")


def test_replaying_a_merge_record_and_a_merge_yaml(cli, vlm, reasoning, tmp_path):
    first = cli("merge", "--reasoning", reasoning, "--vlm", vlm, "-o", tmp_path / "a", "--method", "ties",
                "--density", "0.3", "--modules", "attn,mlp", "--layers", "0", "--no-bias")  # fmt: skip
    assert first.exit_code == 0, first.output
    assert cli("merge", "--config", tmp_path / "a" / "surgeon.json", "-o", tmp_path / "b").exit_code == 0
    (tmp_path / "m.yaml").write_text(
        f"reasoning: {reasoning}\nvlm: {vlm}\noutput: {tmp_path / 'c'}\nmethod: ties\ndensity: 0.3\n"
        "modules: [attn, mlp]\nlayers: '0'\nno-bias: true\n"
    )
    assert cli("merge", "--config", tmp_path / "m.yaml").exit_code == 0
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b") == _bytes(tmp_path / "c")
    assert read_record(tmp_path / "c")["config"]["bias"] is False


def test_bad_config_files_are_one_line_errors(cli, vlm, data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max-steps: [1\n")
    assert_one_line_error(cli("train", "--config", bad), "not valid YAML")
    bad.write_text("- max-steps\n")
    assert_one_line_error(cli("train", "--config", bad), "not a mapping")
    bad.write_text("max-stepz: 3\n")
    assert_one_line_error(cli("train", "--config", bad), "'max-stepz'", "max-steps")
    assert_one_line_error(cli("train", "--config", tmp_path / "none.yaml"), "is not a file")
    record = tmp_path / "surgeon.json"
    record.write_text(json.dumps({"surgeon_version": "0", "command": "merge", "config": {}}))
    assert_one_line_error(cli("train", "--config", record), "records a `surgeon merge` run", "surgeon merge --config")
