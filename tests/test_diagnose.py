"""``surgeon diagnose``: perception share of tokens and loss, through the CLI, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_error


def test_shares_match_a_per_sample_computation(cli, shapes_data, vlm):
    from transformers import AutoModelForImageTextToText

    from surgeon.data.scan import load_samples
    from surgeon.data.encoding import SampleEncoder

    data = shapes_data("sharegpt")
    result = cli("diagnose", data, "--model", vlm, "--batch-size", "5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    # independently: one sample at a time, plain cross-entropy of each label from the previous logits
    encoder = SampleEncoder.from_pretrained(vlm)
    model = AutoModelForImageTextToText.from_pretrained(vlm).eval()
    sums, counts = {True: 0.0, False: 0.0}, {True: 0, False: 0}
    for sample in load_samples(data):
        enc = encoder.encode(sample)
        single = encoder.collate([enc])
        single.pop("perception_mask")
        with torch.no_grad():
            logits = model(**single).logits[0]
        for t in range(1, len(enc)):
            if enc.labels[t] != -100:
                is_p = bool(enc.perception_mask[t])
                sums[is_p] += F.cross_entropy(logits[t - 1], enc.labels[t]).item()
                counts[is_p] += 1
    assert report["perception_tokens"] == counts[True] > 0 and report["reasoning_tokens"] == counts[False]
    assert report["token_share"] == pytest.approx(counts[True] / (counts[True] + counts[False]))
    assert report["loss_share"] == pytest.approx(sums[True] / (sums[True] + sums[False]), rel=1e-4)
    assert report["stats"]["read"] == report["stats"]["used"] == 12 and report["stats"]["skipped"] == {}

    text = cli("diagnose", data, "--model", vlm, "--max-samples", "3")
    assert text.exit_code == 0 and "3 read, 3 used, 0 skipped" in text.stdout and "% of supervised tokens" in text.stdout


@pytest.fixture
def bad_data(tmp_path, shapes_data):
    """A copy of the synthetic data with line 2 malformed and line 4 naming a missing image."""
    lines = shapes_data("llamafactory").read_text().splitlines()
    lines[1] = lines[1][:40]
    lines[3] = lines[3].replace('"images": ["images/', '"images": ["gone/')
    path = shapes_data("llamafactory").parent / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    yield path
    path.unlink()


def test_bad_lines_are_one_line_errors_with_line_numbers(cli, bad_data, vlm):
    assert_one_line_error(cli("diagnose", bad_data, "--model", vlm), "bad.jsonl:2: malformed JSON", "--skip-bad-lines")
    result = cli("diagnose", bad_data, "--model", vlm, "--skip-bad-lines", "--max-length", "50", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    assert stats["skipped"]["malformed JSON"] == 1 and stats["skipped_lines"]["malformed JSON"] == [2]
    assert stats["skipped_lines"]["missing image file"] == [4]
    too_long = stats["skipped"]["no supervised tokens within max_length (50)"]
    assert stats["read"] == 12 and stats["used"] == 12 - 2 - too_long > 0


def test_other_errors_are_one_line(cli, shapes_data, vlm, tmp_path, llm):
    data = shapes_data("trl")
    assert_one_line_error(cli("diagnose", tmp_path / "nope.jsonl", "--model", vlm), "nope.jsonl: no such file")
    assert_one_line_error(cli("diagnose", data, "--model", tmp_path / "none"), "none: no such folder")
    (tmp_path / "weights-only").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "weights-only" / name).write_bytes((vlm / name).read_bytes())
    assert_one_line_error(cli("diagnose", data, "--model", tmp_path / "weights-only"), "cannot load its processor")
    assert_one_line_error(cli("diagnose", data, "--model", llm), "data.jsonl:1: images for a text-only model")
    assert_one_line_error(cli("diagnose", data, "--model", vlm, "--max-length", "8"), "all 12 samples were skipped", "raise max_length")
    assert_one_line_error(cli("diagnose", data, "--model", vlm, "--batch-size", "0"), "batch_size: must be at least 1")
    assert_one_line_error(cli("diagnose", data, "--model", vlm, "--perception-regex", "(x"), "perception_regex")
    assert_one_line_error(cli("diagnose", data, "--model", vlm, "--device", "gpu9"), "device: unknown device 'gpu9'")
