"""``surgeon eval``: answers extracted alike from references and generations, intervals and paired
tests against numbers computed independently, greedy generation equal to transformers' own, the
report folder, bad input, and evaluation during training (surgeon train and the Trainer)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from helpers import assert_one_line_error, image

from surgeon.evaluation import answers, stats


@pytest.mark.parametrize(("text", "want"), [
    ("3 + 4 = 7. So 7 - 2 = 5. Answer: 5", "5"),
    ("We get \\boxed{\\frac{3}{4}} hmm, \\boxed{3/4}", "3/4"),
    ("<answer>Paris</answer> is the capital", "Paris"),
    ("The answer is 42. Let me check with 7.", "42"),
    ("Final answer: 1,000 apples.", "1,000 apples"),
    ("first 5, then 12", "12"),
    ("no number at all", "no number at all"),
    ("", None),
])  # fmt: skip
def test_answers_are_extracted_by_the_documented_rules(text, want):
    assert answers.extract(text) == want


def test_answers_compare_numbers_by_value_and_text_folded():
    assert answers.same("1,000 apples", "1000") and answers.same("12.0", "12") and answers.same("3/4", "0.75")
    assert answers.same("The Red circle.", "red circle") and not answers.same("7", "17") and not answers.same(None, None)
    assert answers.extract("Answer: 5, or Answer: 6", __import__("re").compile(r"Answer: (\d)")) == "6"
    assert answers.contains("There are 3 red tiles. So 3.", "There are 3 red tiles.") and not answers.contains("There are 4 red", "There are 3 red")


def test_intervals_and_tests_equal_their_textbook_values():
    # Wilson 95 % for 7/10 (Newcombe 1998, table I): 0.3968 .. 0.8922; 0/10: 0 .. 0.2775
    assert stats.wilson(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert stats.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4) and stats.wilson(10, 10)[1] == 1.0
    # McNemar exact: 1 vs 8 discordant pairs -> 2·P(X ≤ 1), X ~ Bin(9, 1/2) = 2·10/512
    assert stats.mcnemar(1, 8) == pytest.approx(20 / 512) and stats.mcnemar(0, 0) == 1.0 and stats.mcnemar(5, 5) == 1.0
    first = [True] * 30 + [False] * 30
    second = [True] * 45 + [False] * 15
    low, high = stats.paired_bootstrap(first, second, rounds=4000, seed=1)
    assert low < 0.25 < high and stats.paired_bootstrap(first, second, rounds=4000, seed=1) == (low, high)
    result = stats.compare(first, second, rounds=500)
    assert result["difference"] == pytest.approx(0.25) and (result["better"], result["worse"]) == (15, 0)
    assert result["p_value"] == pytest.approx(2 / 2**15)


def _sets(tmp_path):
    """An image set (answers in the reference messages, perception tagged) and a text set (answers in a field)."""
    for i in range(4):
        image(i).save(tmp_path / f"{i}.png")
    images = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": f"{i}.png"}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": f"<perception>There are {i} tiles.</perception> So {i}. Answer: {i}"}]} for i in range(4)]  # fmt: skip
    text = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": i + 1} for i in range(5)]
    (tmp_path / "img.jsonl").write_text("".join(json.dumps(r) + "\n" for r in images))
    (tmp_path / "txt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    return f"img={tmp_path / 'img.jsonl'}", f"txt={tmp_path / 'txt.jsonl'}"


def test_eval_reports_models_side_by_side(cli, vlm, llm, tmp_path):
    img, txt = _sets(tmp_path)
    out = tmp_path / "report"
    result = cli("eval", vlm, llm, "--set", img, "--set", txt, "-o", out, "--max-new-tokens", 6, "--batch-size", 3)
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {tuple(sorted(r)) for r in rows} >= {("correct", "extracted", "generated", "id", "model", "prompt", "reference", "set")}
    assert len([r for r in rows if r["model"] == str(vlm)]) == 9 and len([r for r in rows if r["model"] == str(llm)]) == 5
    assert all(r["prompt"].rstrip().endswith("assistant") for r in rows)  # the generation prompt is part of the prompt
    assert {r["reference"] for r in rows if r["set"] == "txt"} == {"1", "2", "3", "4", "5"}
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["models"][str(vlm)]["img"]
    assert entry["n"] == 4 and 0 <= entry["accuracy"] <= 1 and len(entry["wilson_95"]) == 2 and "perception" in entry
    assert set(summary["comparisons"][str(llm)]) == {"txt"} and "p_value" in summary["comparisons"][str(llm)]["txt"]
    assert any("text-only" in n and "img" in n for n in summary["notes"])
    assert (out / "tax.png").stat().st_size > 1000 and (out / "surgeon.json").exists()
    assert "Δ" in result.stdout and "note:" in result.stdout


def test_generation_is_a_plain_greedy_generate_with_the_same_batches(vlm, tmp_path):
    """The completions equal a plain transformers ``generate`` loop over the same left-padded batches."""
    from surgeon.data.encoding import SampleEncoder
    from surgeon.evaluation.generate import Generator, read_items
    from surgeon.modules.folders import load_eval_model

    _, txt = _sets(tmp_path)
    items, _ = read_items(txt)
    model = load_eval_model(vlm, "cpu")
    encoder = SampleEncoder.from_pretrained(vlm)
    ours = [c.generated for c in Generator(model, encoder, max_new_tokens=8, batch_size=2)(items)]
    tok = encoder.tokenizer
    tok.padding_side = "left"
    plain = []
    for b in range(0, len(items), 2):
        prompts = [encoder.prompt(i.prompt) for i in items[b : b + 2]]
        batch = encoder.processor(text=prompts, padding=True, return_tensors="pt")
        ids = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=encoder.stop_token_ids(), pad_token_id=tok.pad_token_id)
        for seq in ids[:, batch["input_ids"].shape[1] :].tolist():
            cut = next((k for k, t in enumerate(seq) if t in encoder.stop_token_ids()), len(seq))
            plain.append(tok.decode(seq[:cut], skip_special_tokens=True))
    assert ours == plain


def test_bad_input_is_one_line_and_leaves_no_report(cli, vlm, tmp_path):
    img, txt = _sets(tmp_path)
    out = tmp_path / "r"
    (tmp_path / "none.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert_one_line_error(cli("eval", vlm, "--set", f"x={tmp_path / 'none.jsonl'}", "-o", out), "no row with a reference")
    assert_one_line_error(cli("eval", vlm, "--set", "nonsense", "-o", out), "NAME=DATA")
    assert_one_line_error(cli("eval", vlm, "--set", txt, "--set", txt, "-o", out), "repeat")
    assert_one_line_error(cli("eval", vlm, tmp_path / "missing-model", "--set", txt, "-o", out, "--max-new-tokens", 2), "missing-model")
    assert not out.exists() and not list(tmp_path.glob(".r.surgeon-*"))
    (tmp_path / "2.png").write_bytes(b"not a png")  # item 2 of the image set cannot be asked
    done = cli("eval", vlm, "--set", img, "-o", out, "--max-new-tokens", 2, "--json")
    assert done.exit_code == 0, done.output
    entry = json.loads(done.stdout)["models"][str(vlm)]["img"]
    assert entry["n"] == 3 and entry["errors"][0]["id"] == 3 and "unreadable image" in entry["errors"][0]["error"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone"), "peft_type": "LORA"}))
    assert_one_line_error(cli("eval", adapter, "--set", txt, "-o", tmp_path / "r2"), "base model", "not found")
    assert_one_line_error(cli("eval", vlm, "--set", txt, "--lm-eval", "gsm8k", "-o", tmp_path / "r3", "--max-new-tokens", 2), "surgeon[eval]")


def test_lm_eval_scores_join_the_summary_through_its_api(cli, vlm, tmp_path, monkeypatch):
    """A stand-in of lm-eval-harness's API (the package is not installed here): what simple_evaluate
    returns is put in the summary for each model."""
    calls = []
    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda model, tasks, limit: calls.append((type(model).__name__, tasks, limit)) or {"results": {"arc_easy": {"acc,none": 0.5, "alias": "x"}}}
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = type("HFLM", (), {"__init__": lambda self, pretrained, tokenizer: None})
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    _, txt = _sets(tmp_path)
    done = cli("eval", vlm, "--set", txt, "--lm-eval", "arc_easy", "--limit", 2, "--max-new-tokens", 2, "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["lm_eval"][str(vlm)] == {"arc_easy": {"acc,none": 0.5}} and calls == [("HFLM", ["arc_easy"], 2)]


def test_training_logs_eval_accuracy_and_the_forgetting_monitor(cli, vlm, data, tmp_path):
    _, txt = _sets(tmp_path)
    out = tmp_path / "run"
    done = cli("train", vlm, "--data", data, "-o", out, "--max-steps", 3, "--eval-set", txt, "--eval-every", 2, "--eval-max-new-tokens", 4,
               "--report-to", "tensorboard", "--full", "--lr", "1e-2")  # fmt: skip
    assert done.exit_code == 0, done.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m for m in lines if "eval/txt/accuracy" in m]
    assert [m["step"] for m in evaluated] == [2, 3] and all(m["eval/txt/n"] == 5 for m in evaluated)
    assert evaluated[0]["kl_base"] > 0 and evaluated[1]["kl_base"] > evaluated[0]["kl_base"]  # it drifts from the base as it trains
    assert "eval after step 2: txt/accuracy" in done.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.*")).parent))
    events.Reload()
    assert any("kl_base" in tag for tag in events.Tags()["scalars"])
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "x", "--eval-set", txt), "eval_every", "--eval-every")


def test_the_trainer_route_evaluates_through_a_callback(vlm, data, tmp_path):
    from transformers import Trainer, TrainingArguments

    from helpers import trl_rows
    from surgeon import EvalCallback, PerceptionCollator
    from surgeon.modules.folders import load_model

    _, txt = _sets(tmp_path)
    model = load_model(vlm, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, report_to="none",
                             save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True, logging_steps=100)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=trl_rows(data, 4), data_collator=PerceptionCollator(vlm, base=data.parent))
    EvalCallback([txt], every=1, model=vlm, max_new_tokens=3).attach(trainer)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eval/txt/accuracy" in e]
    assert len(logged) == 2 and all("kl_base" in e for e in logged)


def test_an_answer_pattern_reads_the_completion_and_a_worked_reference_but_not_a_bare_answer():
    """With a pattern (the study's ``Answer: N``), a reference that is a bare answer (a row's
    ``answer`` field) is taken as it is, and a worked solution by the pattern."""
    import re

    from surgeon.evaluation.generate import Completion, Item
    from surgeon.evaluation.run import score

    pattern = re.compile(r"Answer:\s*(-?\d+)")
    done = [Completion("p", "3 + 4 = 7. Answer: 7"), Completion("p", "3 + 4 = 7. Answer: 7"), Completion("p", "7")]
    items = [Item("s", 1, (), "7"), Item("s", 2, (), "3 + 5 = 8. Answer: 8"), Item("s", 3, (), "7")]
    rows = score(done, items, "m", pattern)
    assert [r["reference"] for r in rows] == ["7", "8", "7"]
    assert [r["correct"] for r in rows] == [True, False, False]  # the last completion gives no `Answer:`
