"""Hub repo ids as inputs, end to end against the local stand-in (no internet): push, then
inspect, prior and load what was pushed; a server that answers with an error is reported as such."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, logits, run_without_torch

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


def _two_shards(src, dst):
    """``src`` with its weights split over two files and an index, as sharded releases are saved."""
    import shutil

    from safetensors.torch import load_file

    from surgeon.io.safetensors import write_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        write_file(dst / file, {n: tensors[n] for n in part}, {"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {n: f for f, part in halves.items() for n in part}}  # fmt: skip
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_inspect_of_a_repo_id_fetches_only_the_config_and_the_headers(cli, hub_standin, vlm, tmp_path):
    from huggingface_hub import constants

    from surgeon.errors import CheckpointError
    from surgeon.hub.sources import open_checkpoint

    for repo, folder in (("acme/one", vlm), ("acme/sharded", _two_shards(vlm, tmp_path / "sharded"))):
        assert cli("push", folder, "--repo", repo, "--token", TOKEN).exit_code == 0
        before = len(hub_standin.requests)
        shown = cli("inspect", repo, "--json")
        assert shown.exit_code == 0, shown.output
        assert {**json.loads(shown.stdout), "source": ""} == {**json.loads(cli("inspect", folder, "--json").stdout), "source": ""}
        weights = [r for r in hub_standin.requests[before:] if r.path.endswith(".safetensors")]
        assert weights and all(r.method == "GET" and r.headers.get("range", "").startswith("bytes=") for r in weights), weights
        blocked = run_without_torch(["inspect", repo, "--json"])  # and without torch
        assert blocked.returncode == 0 and json.loads(blocked.stdout) == json.loads(shown.stdout), blocked.stderr[-1000:]
    assert not list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors"))  # no weights were downloaded
    with open_checkpoint("acme/sharded", headers_only=True) as ckpt:
        assert len(ckpt.files) == 2 and ckpt.commit
        with pytest.raises(CheckpointError, match="headers only"):
            ckpt.read(next(iter(ckpt.tensors)))


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
