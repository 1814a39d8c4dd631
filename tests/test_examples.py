"""Every example runs (CPU-sized) and shows what it claims."""

from __future__ import annotations

import pytest

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


def _reasoning_tax(name: str):
    import sys

    sys.path.insert(0, str(EXAMPLES / "reasoning_tax"))
    try:
        spec = importlib.util.spec_from_file_location(f"reasoning_tax_{name}", EXAMPLES / "reasoning_tax" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES / "reasoning_tax"))


def test_reasoning_tax_tasks_are_right():
    import random
    import re

    organism = _reasoning_tax("organism")
    rng = random.Random(0)
    for k in (1, 2, 3, 4):
        for _ in range(50):
            record = organism.text_problem(rng, k)
            answer = record["messages"][1]["content"][0]["text"]
            steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", answer)
            assert len(steps) == k
            for a, op, b, c in steps:
                assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
            assert [s[0] for s in steps[1:]] == [s[3] for s in steps[:-1]]  # each step starts from the last result
            assert answer.endswith(f"Answer: {steps[-1][3]}") and record["answer"] == steps[-1][3]
    for _ in range(30):
        record, image = organism.visual_problem(rng, "x.png", 2)
        count, colour = int(record["count"]), record["colour"]
        # one tile per visual token: sample each tile's centre
        tiles = [image.getpixel((x * organism.TILE + 14, y * organism.TILE + 14)) for y in range(organism.ROWS) for x in range(organism.COLS)]
        assert tiles.count(organism.COLOURS[colour]) == count
        answer = record["messages"][1]["content"][0]["text"]
        assert answer.startswith(f"<perception>There are {count} {colour} tiles.</perception> {count} ")


@pytest.mark.slow
def test_reasoning_tax_quick_runs_every_condition_through_surgeon(tmp_path):
    """The study's --quick run: every condition's commands run and their outputs are evaluated."""
    import json
    import subprocess
    import sys

    work = tmp_path / "rt"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "reasoning_tax" / "run.py"), "--workdir", str(work), "--quick"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr
    result = json.loads((work / "results.json").read_text())
    study = _reasoning_tax("run")
    assert [r["condition"] for r in result["rows"]] == [c.name for c in study.CONDITIONS]
    runs = {r["condition"]: r for r in result["runs"]}
    for cond in study.CONDITIONS:
        run = runs[cond.name]
        assert len(run["commands"]) == len(cond.commands)
        assert 0 <= run["text"] <= 1
        assert (run["perception"] is None) == cond.text_only and (run["end_to_end"] is None) == cond.text_only
        if cond.commands:  # every output folder carries the command's record
            assert (work / "runs" / f"{cond.slug}-seed0" / "surgeon.json").exists()
    commands = {name: " ".join(run["commands"]) for name, run in runs.items()}
    assert "--prior" in commands["SFT full + DRIFT gradnorm"] and "--drift-scale gradnorm" in commands["SFT full + DRIFT gradnorm"]
    assert "inject-iada" in commands["SFT LoRA + IADA fixed"] and "--mode fixed" in commands["SFT LoRA + IADA fixed"]
    assert commands["Image-LoRA"].startswith("surgeon score-heads") and "--image-lora" in commands["Image-LoRA"]
    assert "--perception-weight dynamic" in commands["SFT full, perception λ dynamic"]
    assert "--method ties" in commands["merge TIES"]
    # Image-LoRA adapts only visual tokens of a frozen language model: text answers are the VLM's
    assert runs["Image-LoRA"]["text"] == runs["VLM, no SFT"]["text"]
    assert "| SFT full + DRIFT adaptive_cosine | 1 |" in (work / "results.md").read_text()


def test_reasoning_tax_refuses_bad_options_in_one_line(tmp_path):
    import subprocess
    import sys

    script = str(EXAMPLES / "reasoning_tax" / "run.py")
    for extra, says in (
        (["--device", "tpu"], "--device tpu: no such device here"),
        (["--conditions", "sft-full,sft-fool"], "no condition sft-fool; choose from base-lm"),
        (["--render"], "results.json does not exist"),
    ):
        done = subprocess.run([sys.executable, script, "--workdir", str(tmp_path / "rt"), *extra], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.startswith("Error: ") and says in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rt").exists()  # nothing written


@pytest.mark.parametrize("route", [[], ["--trl", "--perception-weight", "0.5"]], ids=["trainer", "trl"])
def test_trainer_drift_example_trains_with_the_prior(vlm, data, tmp_path, route):
    """The script of docs/integrations.md: it trains the language model only, with DRIFT, and saves a
    folder transformers loads."""
    import torch
    from transformers import AutoModelForImageTextToText

    from surgeon.demo import tiny
    from surgeon.drift.prior import PriorConfig, compute_prior

    reasoning = tiny.build_reasoning_llm(vlm, tmp_path / "r1", scale=0.5)
    compute_prior(PriorConfig(reasoning=str(reasoning), vlm=str(vlm), output=str(tmp_path / "prior")))
    out = load("trainer_drift").main([str(vlm), str(data), str(tmp_path / "prior"), "-o", str(tmp_path / "run"), "--max-steps", "2", "--lr", "1e-3", *route])
    before = AutoModelForImageTextToText.from_pretrained(vlm).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".language_model." in k or "lm_head" in k for k in changed), sorted(changed)[:5]
