"""``surgeon push`` end to end: the real huggingface_hub client against the local Hub stand-in.

Asserts the exact files and bytes that arrived (safetensors shards through LFS), the card's
metadata and loading snippet per artifact, that a dry run sends nothing, that no token or local
path is uploaded, and that every Hub error is one line that leaves the folder as it was.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import run_without_torch, BASE, LLM, TOKEN, VLM, assert_one_line_error, snapshot

from surgeon.io.provenance import build_record
from surgeon.io.safetensors import write_file

def metadata(card: str) -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", card, re.S).group(1))


def snippet(card: str) -> str:
    return re.search(r"## How to load\n\n```python\n(.*?)```", card, re.S).group(1)


EXPECTED = {
    "merge": {
        "base_model": [VLM["source"], LLM["source"]], "base_model_relation": "merge", "library_name": "transformers",
        "pipeline_tag": "image-text-to-text", "tags": ["surgeon", "merge", "ties"],
    },
    "prior": {"base_model": [VLM["source"], LLM["source"]], "tags": ["surgeon", "drift", "reasoning-prior"]},
    "adapter": {
        "base_model": BASE["source"], "base_model_relation": "adapter", "library_name": "peft",
        "pipeline_tag": "text-generation", "tags": ["surgeon", "drift", "lora", "perception-reweighting"],
    },
    "remote-code": {
        "base_model": BASE["source"], "library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["surgeon", "iada"],
    },
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_push_sends_exact_files_and_a_card_per_artifact(cli, hub_standin, folder, kind):
    src = folder(kind)
    before = snapshot(src)
    repo = f"acme/tiny-{kind}"
    result = cli("push", src, "--repo", repo, "--token", TOKEN)
    assert result.exit_code == 0, result.output
    assert snapshot(src) == before  # the folder is never written

    arrived = hub_standin.files(repo)
    card = arrived.pop("README.md").decode()
    expected_files = dict(before)
    if kind == "adapter":  # the base's local path is replaced by its Hub id in the uploaded copy
        sent = json.loads(arrived["adapter_config.json"])
        assert sent["base_model_name_or_path"] == BASE["source"]
        local = json.loads(before["adapter_config.json"])
        assert {k: v for k, v in sent.items() if k != "base_model_name_or_path"} == {k: v for k, v in local.items() if k != "base_model_name_or_path"}
        assert "adapter_config.json: base_model_name_or_path set to" in result.stdout
        del arrived["adapter_config.json"], expected_files["adapter_config.json"]
        # peft wrote the blank Hub template (base_model: a local path): replaced, not kept.
        assert b"[More Information Needed]" in expected_files.pop("README.md")
        assert "blank model-card template" in result.stdout
    assert arrived == expected_files  # exact paths and bytes

    # Both repo creation and upload reached the stand-in, authenticated; weights went through LFS.
    endpoints = [r.endpoint for r in hub_standin.requests]
    assert endpoints.index("create") < endpoints.index("preupload") < endpoints.index("commit") == len(endpoints) - 1
    assert "validate-yaml" in endpoints and not hub_standin.unhandled
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub_standin.requests if r.endpoint in ("create", "preupload", "commit"))
    shards = sorted(n for n in before if n.endswith(".safetensors"))
    lfs = {r.path.rsplit("/", 1)[1]: r.body for r in hub_standin.requests if r.endpoint == "lfs-upload"}
    assert sorted(lfs.values(), key=len) == sorted((before[s] for s in shards), key=len)
    assert len(shards) >= 2 if kind == "merge" else len(shards) == 1
    [commit] = hub_standin.commits(repo)
    assert commit.summary == f"Upload {json.loads(before['surgeon.json'])['artifact']} made by surgeon {json.loads(before['surgeon.json'])['command']}"

    assert metadata(card) == EXPECTED[kind]
    uploaded = b"".join(hub_standin.files(repo).values()) + b"".join(r.body for r in hub_standin.requests)
    assert TOKEN.encode() not in uploaded
    assert str(src.resolve()).encode() not in uploaded and str(src.parent).encode() not in uploaded


def _run_snippet(card: str, local: dict[str, Path]) -> dict:
    """Run the card's loading snippet with its Hub ids pointed at local folders."""
    code = snippet(card)
    for hub_id, path in local.items():
        assert f'"{hub_id}"' in code, (hub_id, code)
        code = code.replace(f'"{hub_id}"', repr(str(path)))
    scope: dict = {}
    exec(compile(code, "card-snippet", "exec"), scope)  # noqa: S102 — the card's own snippet
    return scope


def test_load_snippets_load_what_the_folder_holds(outputs):
    from surgeon.publish.card import build_card, load_snippet
    from surgeon.io.provenance import read_record

    made, models = outputs
    scope = _run_snippet(build_card(made["merge"], "acme/m"), {"acme/m": made["merge"]})
    assert type(scope["model"]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(scope["processor"]).__name__ == "Qwen2_5_VLProcessor"

    scope = _run_snippet(build_card(made["adapter"], "acme/a"), {"acme/a": made["adapter"], BASE["source"]: models["llm"]})
    assert type(scope["model"]).__name__.startswith("PeftModel") and scope["model"].peft_config["default"].r == 2
    assert "tokenizer" in scope

    card = build_card(made["remote-code"], "acme/r")
    assert "trust_remote_code=True" in snippet(card) and "`modeling_tiny_iada.py`" in card
    scope = _run_snippet(card, {"acme/r": made["remote-code"]})
    assert type(scope["model"]).__name__ == "TinyIadaForCausalLM"

    text = load_snippet(read_record(made["prior"]), made["prior"], "acme/p")
    assert 'open_prior("acme/p")' in text and "not a model" in text and "surgeon train" in text


def test_card_sections_follow_surgeon_json(outputs, tmp_path):
    import torch

    from surgeon.publish.card import build_card, card_metadata, load_snippet

    made, _ = outputs
    prior = build_card(made["prior"], "acme/p")
    table = prior[prior.index("**layers**") :]
    assert table.count("\n| ") == 1 + 8  # header + one row per (layer, family)
    assert "| 3 | mlp | 3.5 | 0.03 | 0.98 |" in table and "DRIFT reasoning prior" in prior
    assert "| `normalize` | yes |" in prior and "| `families` | attn, mlp |" in prior
    merge = build_card(made["merge"], "acme/m").split("## Settings")[1].split("\n## ")[0]
    assert "| `density` | 0.2 |" in merge and "output" not in merge  # where it was written is not a setting

    adapter = build_card(made["adapter"], "acme/a")
    training = adapter.split("## Training")[1].split("\n## ")[0]
    assert "local `data/train.jsonl`" in training and "| perception_loss | 0.8 |" in training
    assert "[Qwen/Qwen2-0.5B-Instruct](https://huggingface.co/Qwen/Qwen2-0.5B-Instruct)" in adapter

    inputs = {"model": VLM, "data": {"source": "acme/vqa", "revision": "main", "commit": "d" * 40}}
    full = build_record("train", "model", {"full": True, "image_lora": "heads.json"}, inputs, methods=("iada", "image-lora"))
    meta = card_metadata(full, made["merge"])
    assert meta["base_model"] == VLM["source"] and meta["base_model_relation"] == "finetune" and meta["datasets"] == ["acme/vqa"]
    assert meta["tags"] == ["surgeon", "iada", "image-lora"]
    heads = build_record("score-heads", "head-scores", {"budget": 7}, {"vlm": VLM}, {"selected": 7})
    meta = card_metadata(heads, made["prior"])
    assert meta == {"base_model": VLM["source"], "tags": ["surgeon", "image-lora", "head-scores"]}
    vlm_adapter = tmp_path / "vlm-adapter"  # an adapter on a VLM: tensors under language_model.*
    vlm_adapter.mkdir()
    write_file(vlm_adapter / "adapter_model.safetensors", {"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4)})
    record = build_record("train", "peft-adapter", {"method": "lora"}, {"model": VLM})
    assert card_metadata(record, vlm_adapter)["pipeline_tag"] == "image-text-to-text"
    assert 'AutoModelForImageTextToText.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct"' in load_snippet(record, vlm_adapter, "acme/v")
    local_only = build_record("merge", "model", {"method": "linear"}, {"vlm": {"source": "/abs/vlm", "fingerprint": "x"}, "reasoning": {"source": "llm", "fingerprint": "y"}})
    assert "base_model" not in card_metadata(local_only, made["merge"])  # never a local path


def test_a_local_base_is_published_as_a_note_never_as_a_path_or_a_bare_name(cli, folder):
    """An adapter trained on a local folder records the folder's full path (so peft finds it from
    anywhere here); the uploaded copy names the base by a note that cannot resolve to a Hub repo."""
    src = folder("adapter")
    local = json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
    record = json.loads((src / "surgeon.json").read_text())
    record["inputs"]["model"] = {"source": local, "fingerprint": "sha256:1"}  # trained on the local folder
    (src / "surgeon.json").write_text(json.dumps(record))
    result = cli("push", src, "--repo", "acme/a", "--dry-run")
    assert result.exit_code == 0, result.output
    note = f"local model folder {Path(local).name} (not on the Hub): load it yourself"
    shown = " ".join(result.stdout.split())  # the terminal may wrap the note
    assert f'adapter_config.json: base_model_name_or_path set to "{note}' in shown
    assert local not in shown


def test_dry_run_sends_nothing(cli, hub_standin, folder):
    src = folder("merge")
    before = snapshot(src)
    result = cli("push", src, "--repo", "acme/dry", "--dry-run")  # no token needed
    assert result.exit_code == 0, result.output
    assert hub_standin.requests == [] and hub_standin.repos == {}
    assert snapshot(src) == before
    for name in [*before, "README.md"]:
        assert name in result.stdout
    assert "base_model_relation: merge" in result.stdout and "## How to load" in result.stdout
    assert "nothing was sent" in result.stderr
    data = json.loads(cli("push", src, "--repo", "acme/dry", "--dry-run", "--json").stdout)
    assert data["dry_run"] and data["commit"] is None and hub_standin.requests == []
    assert {f["path"]: f["bytes"] for f in data["files"]} == {**{k: len(v) for k, v in before.items()}, "README.md": len(data["card"].encode())}


def test_user_readme_is_kept_unless_overwrite_card(cli, hub_standin, folder):
    src = folder("merge")
    mine = "---\nlicense: apache-2.0\n---\n# My merge\n\nWritten by hand.\n"
    (src / "README.md").write_text(mine)
    assert cli("push", src, "--repo", "acme/kept", "--token", TOKEN).exit_code == 0
    assert hub_standin.card("acme/kept") == mine
    result = cli("push", src, "--repo", "acme/kept", "--token", TOKEN, "--overwrite-card")
    assert result.exit_code == 0, result.output
    assert metadata(hub_standin.card("acme/kept"))["base_model_relation"] == "merge"
    assert (src / "README.md").read_text() == mine  # still the user's file locally
    assert len(hub_standin.commits("acme/kept")) == 2


def test_branch_is_created_and_pushed_to(cli, hub_standin, folder):
    src = folder("prior")
    result = cli("push", src, "--repo", "acme/branchy", "--branch", "experiments", "--token", TOKEN, "-m", "first prior")
    assert result.exit_code == 0, result.output
    assert hub_standin.files("acme/branchy", "main") == {}
    assert set(hub_standin.files("acme/branchy", "experiments")) == set(snapshot(src)) | {"README.md"}
    assert hub_standin.commits("acme/branchy")[0].summary == "first prior"
    again = cli("push", src, "--repo", "acme/branchy", "--branch", "experiments", "--token", TOKEN)
    assert again.exit_code == 0 and len(hub_standin.commits("acme/branchy")) == 1  # unchanged: no new commit


def test_token_or_local_path_stops_the_push(cli, hub_standin, folder, monkeypatch):
    src = folder("merge")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "note": TOKEN}))
    leaked = cli("push", src, "--repo", "acme/leak", "--token", TOKEN)
    assert_one_line_error(leaked, "config.json", "access token in use")
    assert TOKEN[3:12] not in leaked.output  # no part of the token is printed
    (src / "config.json").write_text(json.dumps({**cfg, "origin": str(src.parent / "elsewhere" / "vlm")}))
    assert_one_line_error(cli("push", src, "--repo", "acme/leak", "--token", TOKEN), "config.json:", "local path", str(src.parent))
    assert hub_standin.requests == []

    # _name_or_path is dropped from the uploaded copy; surgeon.json names local inputs as local <name>
    (src / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(src.parent / "vlm")}))
    record = json.loads((src / "surgeon.json").read_text())
    record["inputs"]["vlm"] = {"source": "/data/models/my-vlm", "fingerprint": "sha256:9"}
    record["config"]["output"] = str(src.resolve())
    (src / "surgeon.json").write_text(json.dumps(record))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = cli("push", src, "--repo", "acme/leak")
    assert result.exit_code == 0, result.output
    sent = hub_standin.files("acme/leak")
    assert json.loads(sent["config.json"]) == cfg
    uploaded = json.loads(sent["surgeon.json"])
    assert uploaded["inputs"]["vlm"] == {"source": "local my-vlm", "fingerprint": "sha256:9"}
    assert uploaded["config"]["output"] == f"local {src.name}"
    assert json.loads((src / "surgeon.json").read_text())["inputs"]["vlm"]["source"] == "/data/models/my-vlm"  # the local file is kept
    assert "/data/models" not in sent["README.md"].decode() and "local `my-vlm`" in sent["README.md"].decode()


@pytest.mark.parametrize(
    "status,fragments",
    [
        (401, ["acme/err", "refused the credentials", "hf auth login"]),
        (403, ["may not write to this repo", "write access"]),
        (404, ["no such repo", "check --repo"]),
        (429, ["rate-limiting", "run the same command again"]),
        (None, ["cannot reach the Hub at http://127.0.0.1:", "Connection refused", "run the same command again"]),
    ],
)
def test_hub_errors_are_one_line_and_leave_the_folder_as_it_was(cli, hub_standin, folder, monkeypatch, status, fragments):
    from huggingface_hub import constants

    from surgeon.demo.hub_standin import unreachable_url

    src = folder("merge")
    before = snapshot(src)
    if status is None:
        monkeypatch.setattr(constants, "ENDPOINT", unreachable_url())
    else:
        hub_standin.fail(status)
    result = cli("push", src, "--repo", "acme/err", "--token", TOKEN)
    assert_one_line_error(result, *fragments)
    assert TOKEN not in result.output
    assert snapshot(src) == before and "acme/err" not in {r.repo_id for r in hub_standin.repos.values()}

    hub_standin.fail(None)  # the Hub recovers: the same command simply works
    monkeypatch.setattr(constants, "ENDPOINT", hub_standin.url)
    result = cli("push", src, "--repo", "acme/err", "--token", TOKEN)
    assert result.exit_code == 0, result.output
    assert set(hub_standin.files("acme/err")) == set(before) | {"README.md"}


def test_failure_mid_upload_and_invalid_card_metadata(cli, hub_standin, folder):
    src = folder("merge")
    before = snapshot(src)
    hub_standin.fail(403, on="commit")  # after the LFS uploads
    assert_one_line_error(cli("push", src, "--repo", "acme/mid", "--token", TOKEN), "may not write")
    hub_standin.fail(None)
    assert cli("push", src, "--repo", "acme/mid", "--token", TOKEN).exit_code == 0
    assert hub_standin.files("acme/mid") | {"README.md": b""} == before | {"README.md": b""}

    (src / "README.md").write_text("---\nbase_model_relation: bogus\n---\n# mine\n")
    assert_one_line_error(cli("push", src, "--repo", "acme/mid", "--token", TOKEN), "rejected the metadata of README.md", "--overwrite-card")


def test_refused_before_any_request(cli, hub_standin, folder, tmp_path, monkeypatch):
    src = folder("prior")
    assert_one_line_error(cli("push", src, "--repo", "acme/x"), "not logged in", "hf auth login")
    assert_one_line_error(cli("push", src, "--repo", "not a repo", "--token", TOKEN), "is not a Hub repo id", "ORG/NAME")
    assert_one_line_error(cli("push", tmp_path / "nope", "--repo", "acme/x", "--token", TOKEN), "no such folder")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")  # the real Hub: offline applies
    assert_one_line_error(cli("push", src, "--repo", "acme/x", "--token", TOKEN), "HF_HUB_OFFLINE is set", "--dry-run")
    assert hub_standin.requests == []


def test_push_to_hub_option_for_folder_writing_commands(hub_standin, folder, monkeypatch):
    import click
    from click.testing import CliRunner

    from surgeon.cli.group import SurgeonGroup
    from surgeon.cli.push_option import push_to_hub_option, push_written

    src = folder("prior")
    ran = []

    @click.group(cls=SurgeonGroup)
    def group() -> None:
        pass

    @group.command("write")
    @click.argument("output")
    @push_to_hub_option
    def write(output: str) -> None:
        ran.append(output)
        push_written(output)

    runner = CliRunner()
    assert runner.invoke(group, ["write", str(src)]).exit_code == 0 and hub_standin.requests == []  # no option: no push
    assert_one_line_error(runner.invoke(group, ["write", str(src), "--push-to-hub", "acme/p"]), "not logged in")
    assert len(ran) == 1  # refused before the command did any work
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = runner.invoke(group, ["write", str(src), "--push-to-hub", "acme/p"])
    assert result.exit_code == 0, result.output
    assert "pushed" in result.stderr and "README.md" in hub_standin.files("acme/p")
    hub_standin.fail(429)
    assert_one_line_error(runner.invoke(group, ["write", str(src), "--push-to-hub", "acme/p"]), "rate-limiting", f"surgeon push {src} --repo acme/p")


def test_timeouts_and_wrapped_errors_translate_to_one_line():
    import httpx2

    from surgeon.errors import HubError
    from surgeon.hub.errors import translated as _translated

    with pytest.raises(HubError, match=r"acme/x: the Hub at http://h did not answer in time; check the network"):
        with _translated("acme/x", writing=True, endpoint="http://h"):
            raise httpx2.ReadTimeout("timed out")
    with pytest.raises(HubError, match="cannot reach the Hub"):
        with _translated("acme/x", writing=True, endpoint="http://h"):
            try:
                raise httpx2.ConnectError("refused")
            except httpx2.ConnectError as e:
                raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.") from e
    with pytest.raises(KeyError, match="bug"):  # anything else passes through untouched
        with _translated("acme/x"):
            raise KeyError("bug")


def test_library_push_to_an_explicit_endpoint_without_xet_settings(hub_standin, folder, monkeypatch):
    """What ``surgeon demo`` does: push_folder(..., endpoint=standin.url), whatever HF_ENDPOINT says."""
    from huggingface_hub import constants

    from surgeon.publish.push import PushConfig, push_folder
    from surgeon.demo.hub_standin import unreachable_url

    monkeypatch.setattr(constants, "ENDPOINT", unreachable_url())
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # hf_xet is installed: must not be used
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline keeps the Hub away, not loopback
    src = folder("prior")
    result = push_folder(src, PushConfig(repo="demo/prior", token=TOKEN), endpoint=hub_standin.url)
    assert result.commit == hub_standin.commits("demo/prior")[0].oid and result.card_source == "surgeon.json"
    assert set(hub_standin.files("demo/prior")) == set(snapshot(src)) | {"README.md"}
    assert constants.HF_HUB_DISABLE_XET is False and constants.HF_HUB_OFFLINE is True and not hub_standin.unhandled


def test_plan_checks_the_built_card_and_safetensors_metadata(folder):
    import torch

    from surgeon.publish.card import build_card
    from surgeon.io.provenance import read_record
    from surgeon.publish.upload import plan_upload

    src = folder("prior")
    record = read_record(src)
    record["stats"]["written_to"] = str(src.resolve() / "prior.safetensors")  # a leak surgeon must not publish
    refused = dict(plan_upload(src, build_card(src, "acme/p", record), record, TOKEN).refused)
    assert refused["README.md"].startswith("holds the local path") and "prior.safetensors" in refused["README.md"]

    write_file(src / "extra.safetensors", {"x": torch.zeros(1)}, {"format": "pt", "note": f"pushed with {TOKEN}"})
    refused = dict(plan_upload(src, None, read_record(src), None).refused)
    assert refused["extra.safetensors"].startswith("holds what looks like a Hub access token")


def test_every_folder_writing_command_pushes_with_push_to_hub(cli, hub_standin, vlm, llm, tmp_path, monkeypatch):
    """``surgeon prior/merge/inject-iada/score-heads/train … --push-to-hub`` upload what they wrote."""
    from surgeon.cli import main

    monkeypatch.setenv("HF_TOKEN", "hf_test_token_123")
    writers = {"prior", "merge", "inject-iada", "score-heads", "train"}
    assert writers <= {name for name, cmd in main.commands.items() if any(p.name == "push_to_hub" for p in cmd.params)}
    result = cli("prior", "--reasoning", llm, "--vlm", vlm, "-o", tmp_path / "prior", "--push-to-hub", "acme/prior")
    assert result.exit_code == 0, result.output
    files = hub_standin.files("acme/prior")
    assert "surgeon.json" in files and "README.md" in files
    assert files["model.safetensors"] == (tmp_path / "prior" / "model.safetensors").read_bytes()
    card = hub_standin.card("acme/prior")
    assert card.startswith("---") and "- drift" in card.split("---")[1]


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_push_dry_run_needs_no_torch(cli, folder, kind, tmp_path):
    """With torch (and the libraries built on it) unimportable, ``push --dry-run`` prints what it
    prints with them: the files, the card and the refusals."""
    args = ["push", str(folder(kind)), "--repo", "acme/x", "--dry-run", "--json"]
    proc = run_without_torch(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with_torch = cli(*args)
    assert with_torch.exit_code == 0, with_torch.output
    assert json.loads(proc.stdout) == json.loads(with_torch.stdout)


def test_off_a_terminal_a_transfer_prints_lines_while_it_lasts_and_nothing_with_quiet(cli, hub_standin, folder, monkeypatch, tmp_path):
    """No bar can be drawn into a log file: a line every INTERVAL seconds (30 by default; a few
    milliseconds here) while the upload lasts, and one at its end; ``-q`` prints none."""
    from surgeon.hub import transfers

    monkeypatch.setattr(transfers, "INTERVAL", 0.002)
    src = folder("merge")
    loud = cli("push", src, "--repo", "acme/lines", "--token", TOKEN)
    assert loud.exit_code == 0, loud.output
    lines = [line for line in loud.stderr.splitlines() if line.startswith("surgeon: uploading to acme/lines")]
    assert lines and lines[-1].startswith("surgeon: uploading to acme/lines: done in "), loud.stderr
    quiet = cli("-q", "push", src, "--repo", "acme/lines2", "--token", TOKEN)
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr
    from surgeon.hub.download import download_checkpoint

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    got: list[str] = []
    transfers.report_to(got.append)
    try:
        snapshot = Path(download_checkpoint("acme/lines")[0])
    finally:
        transfers.report_to(None)
    sent = sum(p.stat().st_size for p in snapshot.iterdir())
    assert transfers.cache_bytes("acme/lines")() == sent > 0  # what the download lines count
    assert all(line.startswith("downloading acme/lines") for line in got)
