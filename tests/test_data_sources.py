"""Data for ``surgeon train`` / ``diagnose``: JSONL, parquet and ``save_to_disk`` copies of one
dataset (images as files or as embedded bytes) train alike; samples are encoded lazily, so memory
does not grow with the dataset; long runs print plain progress lines and feed TensorBoard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _records(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def copies(shapes_data, tmp_path_factory):
    """The same samples as JSONL (image paths), parquet and save_to_disk (image bytes in an Image column)."""
    from datasets import Dataset, Features, Image, Sequence, Value

    jsonl = shapes_data("sharegpt")
    root = tmp_path_factory.mktemp("sources")
    rows = []
    for r in _records(jsonl):
        images = [{"bytes": (jsonl.parent / p).read_bytes(), "path": Path(p).name} for p in r.get("images", [])]
        rows.append({"conversations": r["conversations"], "images": images})
    features = Features({
        "conversations": [{"from": Value("string"), "value": Value("string")}], "images": Sequence(Image()),
    })  # fmt: skip
    ds = Dataset.from_list(rows, features=features)
    ds.to_parquet(str(root / "data.parquet"))
    ds.save_to_disk(str(root / "saved"))
    return {"jsonl": jsonl, "parquet": root / "data.parquet", "saved": root / "saved"}


def test_jsonl_parquet_and_save_to_disk_give_the_same_first_step(cli, vlm, copies, tmp_path):
    losses = {}
    for name, source in copies.items():
        result = cli("train", vlm, "--data", source, "-o", tmp_path / name, "--max-steps", "1", "--batch-size", "4", "--json")
        assert result.exit_code == 0, result.output
        losses[name] = json.loads(result.stdout)["metrics"]["loss"]
    assert losses["jsonl"] == losses["parquet"] == losses["saved"], losses
    shown = {}
    for name, source in copies.items():
        result = cli("diagnose", source, "--model", vlm, "--json")
        assert result.exit_code == 0, result.output
        shown[name] = json.loads(result.stdout)
    assert shown["jsonl"] == {**shown["parquet"], "data": str(copies["jsonl"])} == {**shown["saved"], "data": str(copies["jsonl"])}
    assert shown["jsonl"]["stats"]["used"] == len(_records(copies["jsonl"]))


def test_score_heads_reads_every_source_alike(cli, vlm, copies, tmp_path):
    scores = {}
    for name, source in copies.items():
        result = cli("score-heads", vlm, "--data", source, "-o", tmp_path / f"{name}.json", "--steps", "2", "--json")
        assert result.exit_code == 0, result.output
        scores[name] = json.loads(result.stdout)["scores"]
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(record["surgeon"]["inputs"]["data"]["sha256"]) == 16
    assert scores["jsonl"] == scores["parquet"] == scores["saved"]


def _big(tmp_path: Path, vlm: Path, n: int) -> tuple[Path, Path]:
    """n samples sharing one 224×224 image, and a copy of the VLM whose processor keeps that size."""
    from PIL import Image

    model = tmp_path / "vlm-224"
    if not model.exists():
        shutil.copytree(vlm, model)
        cfg = json.loads((model / "processor_config.json").read_text())
        cfg["image_processor"].update({"max_pixels": 224 * 224, "min_pixels": 224 * 224, "size": {"shortest_edge": 224 * 224, "longest_edge": 224 * 224}})
        (model / "processor_config.json").write_text(json.dumps(cfg))
        Image.new("RGB", (224, 224), "red").save(tmp_path / "red.png")
    sample = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<perception>Red.</perception> So red."}]},
    ]}  # fmt: skip
    data = tmp_path / f"data-{n}.jsonl"
    data.write_text((json.dumps(sample) + "\n") * n)
    return model, data


def _peak_rss(args: list, cwd: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "surgeon.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else status
    return usage.ru_maxrss * 1024


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_samples(vlm, tmp_path):
    model, small = _big(tmp_path, vlm, 200)
    _, large = _big(tmp_path, vlm, 2000)
    train = ["train", model, "--max-steps", "2", "--batch-size", "1", "--max-length", "1024"]
    a = _peak_rss([*train, "--data", small, "-o", tmp_path / "small"], tmp_path)
    b = _peak_rss([*train, "--data", large, "-o", tmp_path / "large"], tmp_path)
    assert b / a <= 1.2, (a, b)


@pytest.mark.slow
def test_plain_progress_lines_metrics_per_step_and_tensorboard(cli, vlm, shapes_data, tmp_path):
    out = tmp_path / "run"
    args = ["train", vlm, "--data", shapes_data("trl"), "-o", out, "--max-steps", "6", "--log-steps", "1", "--report-to", "tensorboard"]
    proc = subprocess.run([sys.executable, "-m", "surgeon.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == [f"{i}/6" for i in range(1, 7)]
    assert all(k in lines[-1] for k in ("loss", "L_p", "L_r", "λ", "lr", "grad", "tok/s", "elapsed", "ETA"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    events = list(out.glob("logs/*/events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(events[0].parent))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/loss_perception"} <= tags and "loss" not in tags
    # the logged rate is the one each step used: the warm-up and cosine schedule read before each step
    import math

    warmup, total = int(0.03 * 6), 6
    used = [(t / max(1, warmup)) if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup))) for t in range(total)]
    logged = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([1e-4 * u for u in used], rel=1e-9)
    assert [e.value for e in board.Scalars("train/learning_rate")] == pytest.approx(logged, rel=1e-6)
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower()
    every = cli(*args[:6], "-o", tmp_path / "r2", "--max-steps", "6", "--log-steps", "4")
    assert [x.split()[1] for x in every.stderr.splitlines() if x.startswith("step ")] == ["4/6", "6/6"]


def test_a_hub_dataset_trains_like_its_parquet_and_the_card_names_it_at_its_commit(cli, vlm, copies, hub_standin, tmp_path, monkeypatch):
    """``--data org/name`` through the real ``datasets``/``huggingface_hub`` clients against the local
    Hub stand-in: the same first step as the parquet file it holds, the commit it was read at in
    surgeon.json, the dataset under the card's ``datasets:`` and the base's license carried over."""
    from huggingface_hub import HfApi

    from surgeon.io.provenance import read_record
    from surgeon.publish.card import card_metadata

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty datasets cache
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-home" / "datasets"))
    api = HfApi(endpoint=hub_standin.url, token="hf_test")
    api.create_repo("acme/shapes", repo_type="dataset")
    upload = tmp_path / "upload"
    upload.mkdir()
    shutil.copy(copies["parquet"], upload / "train.parquet")
    commit = api.upload_folder(folder_path=upload, repo_id="acme/shapes", repo_type="dataset").oid
    base = tmp_path / "vlm"
    shutil.copytree(vlm, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# a model\n")
    losses = {}
    for name, source in (("hub", "acme/shapes:train"), ("parquet", copies["parquet"])):
        result = cli("train", base, "--data", source, "-o", tmp_path / name, "--max-steps", "1", "--batch-size", "4", "--json")
        assert result.exit_code == 0, result.output
        losses[name] = json.loads(result.stdout)["metrics"]["loss"]
    assert losses["hub"] == losses["parquet"]
    record = read_record(tmp_path / "hub")
    assert record["inputs"]["data"]["commit"] == commit and record["inputs"]["data"]["revision"] == "main" and record["inputs"]["data"]["source"] == "acme/shapes:train"
    assert record["inputs"]["model"]["license"] == "apache-2.0"
    meta = card_metadata(record, tmp_path / "hub")
    assert meta["datasets"] == ["acme/shapes"] and meta["license"] == "apache-2.0"
    assert "datasets" not in card_metadata(read_record(tmp_path / "parquet"), tmp_path / "parquet")
