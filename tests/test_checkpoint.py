"""Checkpoint reading: headers without data, one-tensor reads, shards, Hub cache resolution."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgeon.hub.sources import open_checkpoint
from surgeon.errors import CheckpointError, HubError
from surgeon.io.output import ShardedWriter, TensorSpec
from surgeon.io.header import read_header


def test_headers_give_names_shapes_dtypes_without_reading_data(vlm, monkeypatch):
    import surgeon.io.safetensors as st

    monkeypatch.setattr(st, "read_tensor", lambda *a, **k: pytest.fail("data was read"))
    monkeypatch.setattr(st, "read_into", lambda *a, **k: pytest.fail("data was read"))
    with open_checkpoint(vlm) as ckpt:
        info = ckpt.tensors["model.layers.0.mlp.up_proj.weight"]
        assert info.shape == (128, 64) and info.dtype == "F32"
        assert ckpt.files == ["model.safetensors"]
        assert ckpt.dtype == "F32"


def test_read_matches_the_safetensors_library(vlm):
    with open_checkpoint(vlm) as ckpt, safe_open(str(vlm / "model.safetensors"), "pt") as ref:
        assert set(ckpt.tensors) == set(ref.keys())
        for name in ckpt.tensors:
            assert torch.equal(ckpt.read(name), ref.get_tensor(name)), name


def test_read_leading_rows(vlm):
    with open_checkpoint(vlm) as ckpt:
        full = ckpt.read("model.embed_tokens.weight")
        assert torch.equal(ckpt.read("model.embed_tokens.weight", rows=7), full[:7])


def test_sharded_checkpoint_reads_through_the_index(vlm, tmp_path):
    out = tmp_path / "sharded"
    out.mkdir()
    with open_checkpoint(vlm) as src:
        specs = [TensorSpec(n, i.dtype, i.shape) for n, i in src.tensors.items()]
        with ShardedWriter(out, specs, shard_size=200_000) as w:
            for name, t in src.iter_tensors():
                w.write(name, t)
        shutil.copy(vlm / "config.json", out / "config.json")
        with open_checkpoint(out) as sharded:
            assert len(sharded.files) > 2
            for name in src.tensors:
                assert torch.equal(sharded.read(name), src.read(name))


def test_bf16_and_dtypes_round_trip(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "c": torch.randn(4).half(),
        "e": torch.zeros(0, 3),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ckpt:
        for name, t in tensors.items():
            assert ckpt.read(name).dtype == t.dtype and torch.equal(ckpt.read(name), t)


def test_fingerprint_changes_with_weights_layout_not_with_location(vlm, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(vlm, copy)
    with open_checkpoint(vlm) as a, open_checkpoint(copy) as b:
        assert a.fingerprint() == b.fingerprint()
        assert b.describe() == {"source": str(copy), "fingerprint": a.fingerprint()}
    cfg = json.loads((copy / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(cfg))
    with open_checkpoint(vlm) as a, open_checkpoint(copy) as b:
        assert a.fingerprint() != b.fingerprint()


def _lay_out_hub_cache(home, repo_id, commit, src, ref="main"):
    """Lay out ``src`` in the real huggingface_hub cache format: blobs, snapshots, refs."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"{commit}{i:04d}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob.name}")
    return snap


def test_repo_id_resolves_offline_through_the_cache(vlm, offline_hub):
    snap = _lay_out_hub_cache(offline_hub, "acme/tiny-vl", "0123abcd" * 5, vlm)
    with open_checkpoint("acme/tiny-vl") as ckpt:
        assert ckpt.path == snap
        assert ckpt.commit == "0123abcd" * 5
        assert ckpt.describe()["source"] == "acme/tiny-vl"
        assert ckpt.describe()["revision"] == "main"
        assert "model.layers.0.mlp.up_proj.weight" in ckpt.tensors


def test_repo_id_revision_resolves_through_its_ref(vlm, llm, offline_hub):
    _lay_out_hub_cache(offline_hub, "acme/tiny", "a" * 40, vlm)
    _lay_out_hub_cache(offline_hub, "acme/tiny", "b" * 40, llm, ref="v2")
    with open_checkpoint("acme/tiny", revision="v2") as ckpt:
        assert ckpt.commit == "b" * 40 and "model.embed_tokens.weight" in ckpt.tensors
        assert not any(n.startswith("visual.") for n in ckpt.tensors)


def test_repo_id_not_in_cache_offline_is_a_clear_error():
    with pytest.raises(HubError, match="not in the Hub cache .HF_HUB_OFFLINE"):
        open_checkpoint("acme/absent")


def test_revision_on_a_local_folder_is_refused(vlm):
    with pytest.raises(CheckpointError, match="revision cannot apply"):
        open_checkpoint(vlm, revision="main")


def test_header_parser_rejects_overlong_header(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="corrupt header"):
        read_header(p)


def test_repo_id_at_revision_pins_the_revision(vlm, llm, offline_hub):
    _lay_out_hub_cache(offline_hub, "acme/tiny", "a" * 40, vlm)
    _lay_out_hub_cache(offline_hub, "acme/tiny", "b" * 40, llm, ref="v2")
    with open_checkpoint("acme/tiny@v2") as ckpt:
        assert ckpt.commit == "b" * 40 and ckpt.source == "acme/tiny" and ckpt.revision == "v2"
    with pytest.raises(CheckpointError, match="names revision v2 and --revision main"):
        open_checkpoint("acme/tiny@v2", revision="main")
