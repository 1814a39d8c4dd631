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
