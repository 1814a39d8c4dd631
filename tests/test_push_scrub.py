"""What ``surgeon push`` refuses to publish: tokens in any file (of any size), absolute local
paths in any text file, links that leave the folder; and what it cleans in the uploaded copy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import TOKEN, assert_one_line_error, snapshot

pytestmark = pytest.mark.usefixtures("hub_standin")


def refused(cli, src: Path, *args: str) -> dict[str, str]:
    """The dry run's list of refused files (path -> problem); the dry run exits 1 when any."""
    result = cli("push", src, "--repo", "acme/x", "--dry-run", *args)
    lines = [line.removeprefix("refused: ") for line in result.stdout.splitlines() if line.startswith("refused: ")]
    assert (result.exit_code == 1) == bool(lines), result.output
    return dict(line.split(": ", 1) for line in lines)


@pytest.mark.slow
def test_tokens_are_found_in_files_of_any_name_and_size(cli, folder, hub_standin, monkeypatch):
    src = folder("merge")
    (src / "NOTES").write_text(f"remember: {TOKEN}\n")
    (src / "train.log").write_text("step 1\nHF_TOKEN=sekret-token-123456\n")  # the token in use
    with open(src / "big.txt", "w") as f:  # 60 MB of text, the token at the very end
        f.write(("loss 1.0\n" * 1_000_000) * 6 + f"\n{TOKEN[:-4]}zzzz\n")
    with open(src / "blob.bin", "wb") as f:  # binary, the token across a 1 MiB boundary
        f.write(b"\0" * ((1 << 20) - 10) + TOKEN.encode() + b"\0" * 100)
    found = refused(cli, src, "--token", "sekret-token-123456")
    assert set(found) == {"NOTES", "train.log", "big.txt", "blob.bin"}
    assert all("access token" in p for p in found.values())
    result = cli("push", src, "--repo", "acme/x", "--token", "sekret-token-123456")
    assert_one_line_error(result, "access token", "3 more files would be refused", "--dry-run lists them")
    assert hub_standin.requests == []


def test_local_paths_in_any_text_file_stop_the_push(cli, folder, hub_standin):
    src = folder("merge")
    (src / "notes.txt").write_text(f"data came from {Path.home() / 'private' / 'dataset' / 'train.jsonl'}\n")
    (src / "run.yaml").write_text(f"output_dir: {src.resolve()}\nlr: 1e-5\n")
    (src / "fine.md").write_text("see /usr/share/doc and https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct and /path/to/model\n")
    found = refused(cli, src, "--token", TOKEN)
    assert set(found) == {"notes.txt", "run.yaml"}, found
    assert str(Path.home()) in found["notes.txt"] and str(src.resolve()) in found["run.yaml"]
    assert_one_line_error(cli("push", src, "--repo", "acme/x", "--token", TOKEN), "local path")
    assert hub_standin.requests == []


def test_links_out_of_the_folder_are_refused_by_name(cli, folder, tmp_path, monkeypatch):
    src = folder("prior")
    secret = tmp_path / "hf-home" / "token"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("hf_not_a_real_token_but_private\n")
    os.symlink("/etc/hostname", src / "hostname.txt")
    os.symlink(secret, src / "cached_token")
    os.symlink(tmp_path, src / "outside-dir")
    (src / "sub").mkdir()
    os.symlink("../surgeon.json", src / "sub" / "record-link.json")  # inside the folder: fine
    found = refused(cli, src, "--token", TOKEN)
    assert set(found) == {"hostname.txt", "cached_token", "outside-dir/"}, found
    assert all("outside the folder" in p or "a folder outside" in p for p in found.values())


def test_hub_cache_snapshots_with_links_into_blobs_still_push(cli, folder, tmp_path, hub_standin):
    src = folder("prior")
    repo = tmp_path / "hub" / "models--acme--p"
    snap, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for name, data in snapshot(src).items():
        (blobs / name.replace("/", "_")).write_bytes(data)
        os.symlink(os.path.relpath(blobs / name.replace("/", "_"), snap), snap / name)
    result = cli("push", snap, "--repo", "acme/cached", "--token", TOKEN)
    assert result.exit_code == 0, result.output
    assert set(hub_standin.files("acme/cached")) == set(snapshot(src)) | {"README.md"}


def test_the_uploaded_record_names_local_inputs_by_name_and_keeps_the_local_file(cli, folder, hub_standin):
    src = folder("merge")
    record = json.loads((src / "surgeon.json").read_text())
    record["inputs"]["vlm"] = {"source": "/home/alice/models/qwen-vl", "fingerprint": "sha256:1"}
    record["config"]["output"] = str(src.resolve())
    (src / "surgeon.json").write_text(json.dumps(record))
    before = snapshot(src)
    result = cli("push", src, "--repo", "acme/rec", "--token", TOKEN)
    assert result.exit_code == 0, result.output
    sent = json.loads(hub_standin.files("acme/rec")["surgeon.json"])
    assert sent["inputs"]["vlm"] == {"source": "local qwen-vl", "fingerprint": "sha256:1"}
    assert sent["config"]["output"] == f"local {src.name}"
    assert "surgeon.json: local paths written as `local <name>`" in result.stdout
    assert snapshot(src) == before
