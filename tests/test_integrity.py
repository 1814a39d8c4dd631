"""Hostile or damaged inputs: overlapping safetensors offsets, NaN/Inf weights, strict JSON records."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from helpers import assert_one_line_error
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _rewrite_header(path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_overlapping_or_gapped_offsets_are_refused(cli, llm, vlm, tmp_path):
    bad = tmp_path / "overlap"
    shutil.copytree(llm, bad)
    path = bad / "model.safetensors"

    def overlap(header):  # two same-sized tensors: the second points at the first one's bytes
        names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
        a, b = next((a, b) for a, b in zip(names, names[1:]) if header[a]["shape"] == header[b]["shape"])
        header[b]["data_offsets"] = list(header[a]["data_offsets"])

    _rewrite_header(path, overlap)
    with pytest.raises(SafetensorError):  # safetensors' own reader refuses it too
        load_file(str(path))
    for args in (["inspect", bad], ["prior", "--reasoning", bad, "--vlm", vlm, "-o", tmp_path / "p"]):
        assert_one_line_error(cli(*args), "model.safetensors", "invalid offsets", "overlaps")
    assert not (tmp_path / "p").exists()

    extra = tmp_path / "trailing"
    shutil.copytree(llm, extra)
    with open(extra / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    assert_one_line_error(cli("inspect", extra), "16 bytes after its last tensor")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_an_error_naming_the_tensor(cli, llm, vlm, tmp_path, value):
    damaged = tmp_path / "damaged"
    shutil.copytree(llm, damaged)
    tensors = load_file(str(damaged / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name][3, 5] = value
    save_file(tensors, str(damaged / "model.safetensors"), {"format": "pt"})
    prior = cli("prior", "--reasoning", damaged, "--vlm", vlm, "-o", tmp_path / "prior")
    assert_one_line_error(prior, str(damaged), name, "NaN or Inf")
    for method in ("ties", "task-arithmetic"):
        merged = cli("merge", "--reasoning", damaged, "--vlm", vlm, "-o", tmp_path / method, "--method", method)
        assert_one_line_error(merged, str(damaged), name, "NaN or Inf")
    assert not any((tmp_path / d).exists() for d in ("prior", "ties", "task-arithmetic"))


def test_surgeon_json_is_strict_json_even_for_non_finite_numbers(tmp_path):
    from surgeon.io.provenance import build_record, write_record

    path = write_record(tmp_path, build_record("train", "model", {"lr": 1e-5}, {}, {"final": {"loss": float("nan"), "grad_norm": float("inf")}}))
    text = path.read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert record["stats"]["final"] == {"loss": "nan", "grad_norm": "inf"}
    assert torch.isfinite(torch.tensor(record["config"]["lr"]))


def test_a_huge_data_line_is_a_bad_line_not_unbounded_memory(cli, vlm, shapes_data, tmp_path):
    import resource

    good = shapes_data("trl").read_text().splitlines()
    first = json.loads(good[0])
    first["messages"][-1]["content"][0]["text"] = "<perception>one</perception> " + "x" * (20 * 2**20)  # a 20 MB answer
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([good[1], json.dumps(first), *good[2:]]) + "\n")
    shutil.copytree(shapes_data("trl").parent / "images", tmp_path / "images")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert_one_line_error(cli("diagnose", data, "--model", vlm), f"{data}:2", "line too long", "20.0 MB", "--skip-bad-lines")
    skipped = cli("diagnose", data, "--model", vlm, "--skip-bad-lines", "--json")
    assert skipped.exit_code == 0, skipped.output
    report = json.loads(skipped.stdout)
    assert report["stats"]["skipped"] == {"line too long": 1} and report["stats"]["skipped_lines"] == {"line too long": [2]}
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 500 * 2**20  # no blow-up


def test_diagnose_truncates_to_a_default_length(cli):
    from surgeon.cli import main

    option = next(p for p in main.commands["diagnose"].params if p.name == "max_length")
    assert option.default == 2048
