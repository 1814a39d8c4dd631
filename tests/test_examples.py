"""Every example runs (CPU-sized) and shows what it claims."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inspect_layouts_example(tmp_path):
    rows = load("inspect_layouts").main(tmp_path)
    by_family = {r["family"]: r for r in rows}
    assert by_family["qwen3_vl"]["lm"] == "model.language_model.layers.*"
    assert by_family["llava"]["head"] == "language_model.lm_head.weight"
    assert by_family["gemma3"]["head"] is None
    assert all(r["other"] == 0 for r in rows)


def test_make_dataset_example(tmp_path):
    import json

    from surgeon.demo.synthetic import make_dataset as make

    example = load("make_dataset").main
    paths = {fmt: example([str(tmp_path / fmt), "--n", "14", "--seed", "3", "--fmt", fmt]) for fmt in ("trl", "sharegpt", "llamafactory")}
    rows = [json.loads(line) for line in paths["trl"].read_text().splitlines()]
    assert len(rows) == 14 and {r["kind"] for r in rows} == {"shapes", "count", "chart", "multi", "text", "multiturn"}
    images = sorted(p.name for p in (tmp_path / "trl" / "images").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "sharegpt" / "images").iterdir())
    assert len(images) == sum(len(r.get("images", [])) for r in map(json.loads, paths["sharegpt"].read_text().splitlines()))
    for row in rows:
        answers = [m["content"][0]["text"] for m in row["messages"] if m["role"] == "assistant"]
        assert (f"<perception>{row['perception_reference']}</perception>" in answers[0]) == bool(row["perception_reference"])
        assert answers[-1].endswith(f"Answer: {row['answer']}")
    # deterministic from the seed
    again = make(tmp_path / "again", n=14, seed=3, fmt="trl")
    assert again.read_text() == paths["trl"].read_text()
    assert (tmp_path / "again" / "images" / images[0]).read_bytes() == (tmp_path / "trl" / "images" / images[0]).read_bytes()
    assert make(tmp_path / "other", n=14, seed=4).read_text() != paths["trl"].read_text()
