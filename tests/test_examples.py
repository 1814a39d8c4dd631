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


def test_reasoning_tax_conditions_run_the_commands_they_name():
    """Every condition the study reports is made by the surgeon commands its name says (checked on the
    templates, without running them)."""
    study = _reasoning_tax("run")
    commands = {c.name: [" ".join(t) for t in c.commands] for c in study.CONDITIONS}
    joined = {name: " && ".join(lines) for name, lines in commands.items()}
    assert "--prior {prior} --drift-scale gradnorm" in joined["SFT full + DRIFT gradnorm"]
    assert "--prior {prior_layers}" in joined["SFT full + DRIFT on probed layers"]
    assert "--prior {prior}" in joined["SFT LoRA + DRIFT"] and "--full" not in joined["SFT LoRA + DRIFT"]
    assert "--modules attn_proj" in joined["SFT full, attn_proj only"] and "--modules gate_up" in joined["SFT full, gate_up only"]
    assert "--packing" in joined["SFT full, packed"]
    assert "--perception-weight 0.5" in joined["SFT full + DRIFT, perception λ 0.5"] and "--prior" in joined["SFT full + DRIFT, perception λ 0.5"]
    assert "--vlm {sft_run}" in joined["merge TIES after SFT"] and "--vlm {vlm}" in joined["merge TIES"]
    assert joined["new colours: Image-LoRA"].startswith("score-heads") and "--image-lora" in joined["new colours: Image-LoRA"]
    assert "inject-iada" in joined["SFT LoRA + IADA fixed"] and "--mode fixed" in joined["SFT LoRA + IADA fixed"]
    names = [c.name for c in study.CONDITIONS]
    assert all(c.reference in names for c in study.CONDITIONS if c.reference)
    assert all(c.wave == 2 for c in study.CONDITIONS if "{sft_run}" in joined[c.name])


@pytest.mark.slow
def test_reasoning_tax_runs_through_surgeon_and_reports_paired_tests_and_figures(tmp_path):
    """The study end to end on a smoke-sized organism and a few conditions (one of each kind: text
    model, SFT, packed, a merge after SFT, DRIFT on the probed layers, DRIFT through LoRA, the
    new-colours setting): every command runs, every output is scored by surgeon eval's scorer,
    and the report has paired tests and the three figures."""
    import json
    import subprocess
    import sys

    work = tmp_path / "rt"
    wanted = ("base-lm,sft-full,sft-full-packed,merge-ties-after-sft,sft-full-plus-drift-on-probed-layers,sft-lora,"
              "sft-lora-plus-drift,new-colours-vlm-no-sft,new-colours-sft-lora,new-colours-image-lora")  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "reasoning_tax" / "run.py"), "--workdir", str(work), "--quick", "--sizes", "smoke", "--conditions", wanted],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr
    result = json.loads((work / "results.json").read_text())
    runs = {r["condition"]: r for r in result["runs"]}
    assert set(runs) == {c.name for c in _reasoning_tax("run").CONDITIONS if c.slug in wanted.split(",")}
    for name, run in runs.items():
        assert len(run["correct"]["text"]) == 32 and 0 <= run["text"] <= 1
        assert (run["perception"] is None) == (name == "base LM")
    assert "--vlm " + str(work / "smoke" / "runs" / "sft-full-seed0") in runs["merge TIES after SFT"]["commands"][0]
    layers = result["places"]["smoke"]["layers"]
    assert f"--prior {work / 'smoke' / 'prior-layers'}" in runs["SFT full + DRIFT on probed layers"]["commands"][0]
    expanded = [i for part in layers.split(",") for i in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
    assert json.loads((work / "smoke" / "prior-layers" / "surgeon.json").read_text())["config"]["layers"] == expanded
    assert runs["new colours: SFT LoRA"]["commands"][0].startswith(f"surgeon train {work / 'smoke' / 'vlm-format'} --data ")
    # Image-LoRA adapts only visual tokens of a frozen language model: text answers are the VLM's
    assert runs["new colours: Image-LoRA"]["correct"]["text"] == runs["new colours: VLM, no SFT"]["correct"]["text"]
    summary = {r["condition"]: r for r in json.loads((work / "results-summary.json").read_text())}
    paired = summary["SFT full, packed"]["text"]["vs_reference"]
    assert paired["n"] == 32 and 0 <= paired["p_value"] <= 1 and summary["SFT full, packed"]["reference"] == "SFT full"
    assert "| merge TIES after SFT | 1 | SFT full |" in (work / "results.md").read_text()
    assert sorted(p.name for p in (work / "figures").glob("*.png")) == ["depth.png", "tax.png", "tradeoff.png"]


def test_reasoning_tax_refuses_bad_options_in_one_line(tmp_path):
    import subprocess
    import sys

    script = str(EXAMPLES / "reasoning_tax" / "run.py")
    for extra, says in (
        (["--device", "tpu"], "--device tpu: no such device here"),
        (["--conditions", "sft-full,sft-fool"], "no condition sft-fool; choose from base-lm"),
        (["--sizes", "small,huge"], "no size huge; choose from smoke"),
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
