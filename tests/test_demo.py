"""``surgeon demo`` runs the whole pipeline through the CLI and leaves each step's output behind."""

from __future__ import annotations

import pytest

import json
import shlex

from helpers import assert_one_line_error, help_examples

STEPS = ["build", "inspect", "prior", "merge", "inject-iada", "score-heads", "train", "push"]


def _steps(result):
    return [step["name"] for step in json.loads(result.stdout)["steps"]]


@pytest.mark.slow
def test_demo_runs_every_step_and_pushes_to_a_local_stand_in(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "demo"
    result = cli("demo", "--workdir", "demo", "--hub", "local", "--json")
    assert result.exit_code == 0, result.output
    assert _steps(result) == STEPS
    assert (work / "vlm" / "model.safetensors").exists() and (work / "reasoning-llm" / "model.safetensors").exists()
    assert (work / "prior" / "surgeon.json").exists() and (work / "merged" / "config.json").exists()
    assert (work / "vlm-iada" / "surgeon-iada.safetensors").exists()
    assert (work / "heads" / "heads.json").exists() and (work / "heads" / "surgeon.json").exists()
    record = json.loads((work / "trained" / "surgeon.json").read_text())
    assert record["artifact"] == "model+remote-code" and record["config"]["prior"] and record["config"]["perception_weight"] == "dynamic"
    assert record["stats"]["drift"]["tensors"] + record["stats"]["drift"]["zero_delta"] == 40
    assert "pushed" in result.stderr and "in commit" in result.stderr

    # the commands' help examples on the demo's outputs run as printed (the others: test_docs_run.py)
    examples = [a for a in help_examples(cli) if a[0] != "demo" and any(x.startswith("demo/") for x in a)]
    assert {a[0] for a in examples} >= {"score-heads", "train"}
    for args in examples:
        ran = cli(*args)
        assert ran.exit_code == 0, f"surgeon {shlex.join(args)}\n{ran.output}"


def test_demo_without_a_hub_is_a_dry_run(cli, tmp_path, monkeypatch):
    import surgeon.hub.client

    monkeypatch.setattr(surgeon.hub.client, "endpoint_url", lambda: "http://127.0.0.1:9")  # nothing listens there
    result = cli("demo", "--workdir", tmp_path / "demo", "--json")
    assert result.exit_code == 0, result.output
    assert _steps(result) == STEPS and json.loads(result.stdout)["steps"][-1]["output"].startswith("(dry run)")


def test_demo_refuses_a_remote_hub(cli, tmp_path):
    assert_one_line_error(cli("demo", "--workdir", tmp_path / "d", "--hub", "https://huggingface.co"), "local stand-in")
    assert not (tmp_path / "d").exists()
