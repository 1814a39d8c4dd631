"""surgeon.json: inputs as given, resolved config, no secrets."""

from __future__ import annotations

import json
from dataclasses import dataclass

from surgeon import __version__
from surgeon.hub.sources import open_checkpoint
from surgeon.io.provenance import build_record, read_record, write_record


@dataclass(frozen=True)
class _Config:
    output: str
    token: str | None = None
    weight: float = 0.5


def test_record_holds_inputs_as_given_and_no_token(vlm, tmp_path, monkeypatch):
    monkeypatch.chdir(vlm.parent)
    with open_checkpoint(vlm.name) as ckpt:
        record = build_record("merge", "model", _Config("out", token="hf_secret"), {"vlm": ckpt, "reasoning": [ckpt]}, {"tensors": 3})
    write_record(tmp_path, record)
    text = (tmp_path / "surgeon.json").read_text()
    assert "hf_secret" not in text and "token" not in json.loads(text)["config"]
    back = read_record(tmp_path)
    assert back["surgeon_version"] == __version__ and back["command"] == "merge"
    assert back["inputs"]["vlm"]["source"] == vlm.name  # relative, exactly as typed
    assert back["inputs"]["reasoning"] == [back["inputs"]["vlm"]] and back["artifact"] == "model"
    assert back["inputs"]["vlm"]["fingerprint"].startswith("sha256:")
    assert back["config"] == {"output": "out", "weight": 0.5} and back["stats"] == {"tensors": 3}
    assert str(vlm.parent) not in text
    assert read_record(tmp_path / "absent") is None
