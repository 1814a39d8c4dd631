"""Hub repo ids as inputs, end to end against the local stand-in (no internet): push, then
inspect, prior and load what was pushed; a server that answers with an error is reported as such."""

from __future__ import annotations

import json

import torch
from helpers import assert_one_line_error, logits

TOKEN = "hf_surgeonStandInToken0123456789abcdefXY"


def test_push_then_pull_end_to_end(cli, hub_standin, vlm, llm, tmp_path):
    for repo, folder in (("acme/tiny-vlm", vlm), ("acme/tiny-llm", llm)):
        assert cli("push", folder, "--repo", repo, "--token", TOKEN).exit_code == 0
    shown = cli("inspect", "acme/tiny-vlm", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    resolved = [r for r in hub_standin.requests if r.endpoint == "resolve"]
    assert resolved and not hub_standin.unhandled

    prior = cli("prior", "--reasoning", "acme/tiny-llm", "--vlm", "acme/tiny-vlm", "-o", tmp_path / "prior")
    assert prior.exit_code == 0, prior.output
    record = json.loads((tmp_path / "prior" / "surgeon.json").read_text())
    assert record["inputs"]["vlm"]["source"] == "acme/tiny-vlm" and len(record["inputs"]["vlm"]["commit"]) == 40

    import surgeon

    model = surgeon.load_model("acme/tiny-vlm").eval()
    local = surgeon.load_model(str(vlm)).eval()
    ids = {"input_ids": torch.randint(20, 400, (1, 7))}
    assert torch.equal(logits(model, **ids), logits(local, **ids))


def test_a_server_that_answers_an_error_is_not_called_unreachable(cli, hub_standin, vlm):
    assert cli("push", vlm, "--repo", "acme/v", "--token", TOKEN).exit_code == 0
    hub_standin.fail(501, on="info")
    result = cli("inspect", "acme/v")
    assert_one_line_error(result, "acme/v", "the Hub answered HTTP 501")
    assert "cannot reach" not in result.stderr
    hub_standin.fail(None)
    assert_one_line_error(cli("inspect", "acme/missing"), "acme/missing was not found on the Hub")
    assert_one_line_error(cli("inspect", "acme/v@no-such-branch"), "revision not found")


def test_inspect_without_config_json_says_so(cli, vlm, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((vlm / "model.safetensors").read_bytes())
    result = cli("inspect", folder)
    assert result.exit_code == 0, result.output
    assert "unknown (no config.json)" in result.stdout and "None (None)" not in result.stdout
    assert "config.json is missing" in result.stdout
    report = json.loads(cli("inspect", folder, "--json").stdout)
    assert report["architecture"] is None and report["notes"] and report["params"]["language_model"] > 0
