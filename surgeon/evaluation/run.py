"""``surgeon eval``: several models on several sets, scored alike, compared in pairs.

    report = evaluate(EvalConfig(models=("vlm/", "sft/", "drift/"), sets=("gsm=gsm.jsonl", "charts=charts/"), output="tax/"))
    report.summary["models"]["drift/"]["gsm"]["accuracy"], report.summary["comparisons"]

One model is in memory at a time. Every model answers the same items (``--limit`` of each set);
its answers and the references go through one extraction (``surgeon.evaluation.answers``), and
where the reference marks perception spans, a completion that says each of them is perception-
correct. ``summary.json`` gives, per model and set, n, correct, accuracy and its Wilson 95 %
interval, and for every model after the first its paired comparison with the first (McNemar's
exact p, a bootstrap interval of the difference). A text-only model skips the sets with images
(noted, not scored as wrong); an item that cannot be asked (an unreadable image) is an error,
listed, outside the accuracy. The report folder appears complete or not at all.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgeon.errors import ConfigError, DataError
from surgeon.evaluation import answers, stats
from surgeon.evaluation.generate import Completion, Generator, Item, parse_set, read_items

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalConfig:
    """Options of ``surgeon eval``; each CLI option is one field."""

    models: tuple[str, ...]
    sets: tuple[str, ...]  # NAME=DATA
    output: str | None = None  # the report folder (None: nothing written)
    limit: int | None = None  # items per set (the first ones)
    batch_size: int = 8
    max_new_tokens: int = 256
    answer_regex: str | None = None  # overrides the extraction rules (group 1, else the match)
    perception_regex: str | None = None  # perception spans of the references instead of <perception> tags
    device: str = "auto"
    dtype: str = "auto"
    bootstrap: int = 2000  # resamples of the paired interval
    seed: int = 0
    lm_eval: str | None = None  # lm-eval-harness tasks, comma-separated
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models", "no model given", "name at least one model folder or Hub id")
        if not self.sets and not self.lm_eval:
            raise ConfigError("sets", "no set given", "add --set NAME=DATA (or --lm-eval TASKS)")
        names = [parse_set(s)[0] for s in self.sets]
        if len(set(names)) != len(names):
            raise ConfigError("sets", f"the set names {names} repeat", "give each set its own NAME")
        for field_name in ("batch_size", "max_new_tokens", "bootstrap"):
            if getattr(self, field_name) < 1:
                raise ConfigError(field_name, f"must be at least 1, got {getattr(self, field_name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"must be at least 1, got {self.limit}")
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as e:
                raise ConfigError("answer_regex", f"{self.answer_regex!r} is not a valid regular expression ({e})") from None


@dataclass
class EvalReport:
    """What ``evaluate`` found: one row per model and item, the summary, where it was written."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    output: str | None = None


def score(completions: list[Completion], items: list[Item], model: str, pattern: re.Pattern | None = None) -> list[dict]:
    """The results rows of one model on items: extracted answers, correctness, perception."""
    rows = []
    for item, done in zip(items, completions):
        row: dict[str, Any] = {"model": model, "set": item.set, "id": item.id, "prompt": done.prompt, "generated": done.generated}
        if done.error is not None:
            row.update({"extracted": None, "reference": item.reference, "correct": None, "error": done.error})
        else:
            got, want = answers.extract(done.generated, pattern), reference_answer(item.reference, pattern)
            row.update({"extracted": got, "reference": want, "correct": answers.same(got, want)})
            if item.perception:
                row["perception_correct"] = all(answers.contains(done.generated, span) for span in item.perception)
        rows.append(row)
    return rows


def reference_answer(reference: str | None, pattern: re.Pattern | None = None) -> str | None:
    """The answer a reference gives: by ``pattern`` when it matches (a full worked solution), else by
    the default rules (a bare answer such as a row's ``answer`` field, which no pattern need match)."""
    return answers.extract(reference or "", pattern) or answers.extract(reference or "")


def score_model(model: Any, encoder: Any, items: list[Item], name: str = "model", batch_size: int = 8, max_new_tokens: int = 256,
                pattern: re.Pattern | None = None, progress: Progress | None = None) -> list[dict]:  # fmt: skip
    """Generate and score ``items`` with a loaded model: the function ``surgeon eval`` runs for each
    model (and the evidence study, and training-time evaluation)."""
    done = Generator(model, encoder, max_new_tokens, batch_size)(items, progress)
    return score(done, items, name, pattern)


def evaluate(config: EvalConfig, progress: Progress | None = None, status: Callable[[str], None] | None = None) -> EvalReport:
    """Run every model on every set and write the report folder (see the module docstring)."""
    from surgeon.io.output import check_output

    say = status or (lambda text: None)
    _check_models(config.models)
    if config.output:
        check_output(config.output, config.overwrite, [*config.models, *(parse_set(s)[1] for s in config.sets)])
    pattern = re.compile(config.answer_regex) if config.answer_regex else None
    sets = {parse_set(spec)[0]: read_items(spec, config.limit, config.perception_regex) for spec in config.sets}
    report = EvalReport()
    notes: list[str] = []
    for name, (items, data_stats) in sets.items():
        if data_stats.skipped:
            notes.append(f"set {name}: {sum(data_stats.skipped.values())} rows left out ({data_stats.describe_skipped()})")
    lm_scores: dict[str, dict] = {}
    for model in config.models:
        say(f"loading {model}")
        loaded, encoder = _load(model, config)
        for name, (items, _) in sets.items():
            if any(item.images for item in items) and not encoder.has_images:
                notes.append(f"{model} is a text-only model: set {name} (with images) was not scored")
                continue
            say(f"{model}: {name}, {len(items)} items")
            report.rows += score_model(loaded, encoder, items, model, config.batch_size, config.max_new_tokens, pattern, progress)
        if config.lm_eval:
            lm_scores[model] = run_lm_eval(loaded, encoder, config.lm_eval, config.limit)
        del loaded, encoder
        gc.collect()
    report.summary = summarise(report.rows, list(config.models), list(sets), config.bootstrap, config.seed)
    report.summary["notes"] = notes
    if lm_scores:
        report.summary["lm_eval"] = lm_scores
    if not any(r["correct"] is not None for r in report.rows) and not lm_scores:
        raise DataError("eval", "nothing could be scored: " + ("; ".join(notes) or "every item failed"), "check the models and sets named")
    if config.output:
        report.output = _write(report, config)
    return report


def _check_models(models: tuple[str, ...]) -> None:
    """CheckpointError for a model that is neither a folder here nor shaped like a Hub repo id
    (before any model is loaded and scored)."""
    from surgeon.errors import CheckpointError
    from surgeon.hub.repo_ids import PINNED, REPO_ID

    for model in models:
        path = Path(model).expanduser()
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(model, "is a file, not a model folder", "give the folder that holds config.json (or an adapter's)")
        elif not (REPO_ID.match(model) or PINNED.match(model)) or model.startswith((".", "/", "~")):
            raise CheckpointError(model, "no such folder", "check the path, or give a Hub repo id as org/name")


def summarise(rows: list[dict], models: list[str], sets: list[str], rounds: int = 2000, seed: int = 0) -> dict:
    """Per model and set: n, correct, accuracy, Wilson interval (and the same for perception);
    every later model against the first on the items both answered: McNemar's p and a bootstrap
    interval of the difference; errors listed."""
    table: dict[str, dict] = {}
    comparisons: dict[str, dict] = {}
    by = {(r["model"], r["set"], r["id"]): r for r in rows}
    for model in models:
        table[model] = {}
        for name in sets:
            mine = [r for r in rows if r["model"] == model and r["set"] == name]
            if not mine:
                continue
            table[model][name] = _accuracy([r["correct"] for r in mine if r["correct"] is not None])
            seen = [r["perception_correct"] for r in mine if r.get("perception_correct") is not None]
            if seen:
                table[model][name]["perception"] = _accuracy(seen)
            errors = [{"id": r["id"], "error": r["error"]} for r in mine if r.get("error")]
            if errors:
                table[model][name]["errors"] = errors
    first = models[0]
    for model in models[1:]:
        comparisons[model] = {}
        for name in sets:
            pairs = [(by[(first, name, r["id"])]["correct"], r["correct"]) for r in rows
                     if r["model"] == model and r["set"] == name and (first, name, r["id"]) in by
                     and r["correct"] is not None and by[(first, name, r["id"])]["correct"] is not None]  # fmt: skip
            if pairs:
                comparisons[model][name] = {"against": first, **stats.compare([a for a, _ in pairs], [b for _, b in pairs], rounds, seed)}
    return {"models": table, "comparisons": comparisons}


def _accuracy(correct: list[bool]) -> dict:
    n, k = len(correct), sum(1 for c in correct if c)
    low, high = stats.wilson(k, n)
    return {"n": n, "correct": k, "accuracy": k / n if n else 0.0, "wilson_95": [low, high]}


def _load(model: str, config: EvalConfig) -> tuple[Any, Any]:
    """The model in eval mode and its encoder (the processor of the folder, or of an adapter's base)."""
    from surgeon.data.encoding import SampleEncoder
    from surgeon.modules.folders import load_eval_model

    loaded = load_eval_model(model, config.device, config.dtype)
    source = model
    if not _has_processor(model):
        base = getattr(getattr(loaded, "peft_config", {}).get("default", None), "base_model_name_or_path", None)
        source = base or model
    return loaded, SampleEncoder.from_pretrained(source, name=model)


def _has_processor(folder: str) -> bool:
    path = Path(folder)
    if not path.is_dir():
        return True  # a Hub id: its processor is fetched with it
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"))


def run_lm_eval(model: Any, encoder: Any, tasks: str, limit: int | None) -> dict:
    """lm-eval-harness's ``simple_evaluate`` on a loaded model: its scores per task (numbers only)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError("lm_eval", "lm-eval-harness is not installed", "pip install 'surgeon[eval]' (or pip install lm-eval)") from None
    result = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=encoder.tokenizer), tasks=tasks.split(","), limit=limit)
    scores = (result or {}).get("results", {})
    return {task: {k: v for k, v in values.items() if isinstance(v, (int, float))} for task, values in scores.items()}


def _write(report: EvalReport, config: EvalConfig) -> str:
    from surgeon.io.output import output_folder
    from surgeon.io.provenance import build_record, write_record

    with output_folder(config.output, config.overwrite) as tmp:  # type: ignore[arg-type]
        (tmp / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in report.rows))
        picture = plot(report.summary, tmp / "tax.png")
        if picture is None:
            report.summary["notes"].append("no tax.png: matplotlib is not installed (pip install 'surgeon[plot]')")
        (tmp / "summary.json").write_text(json.dumps(report.summary, indent=1) + "\n")
        inputs = {f"model{i}": {"source": m} for i, m in enumerate(config.models)}
        inputs.update({parse_set(s)[0]: {"source": parse_set(s)[1]} for s in config.sets})
        write_record(tmp, build_record("eval", "evaluation", asdict(config), inputs, {"summary": report.summary}, methods=("eval",)))
    return str(config.output)


def plot(summary: dict, path: Path) -> Path | None:
    """Accuracy with its Wilson interval per set (groups) and model (bars); None without matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary["models"])
    sets = sorted({s for m in models for s in summary["models"][m]})
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(sets) * len(models) ** 0.5 + 2), 3.6))
    width = 0.8 / max(len(models), 1)
    for k, model in enumerate(models):
        xs, ys, lows, highs = [], [], [], []
        for j, name in enumerate(sets):
            entry = summary["models"][model].get(name)
            if entry is None:
                continue
            xs.append(j + (k - (len(models) - 1) / 2) * width)
            ys.append(entry["accuracy"])
            lows.append(max(0.0, entry["accuracy"] - entry["wilson_95"][0]))
            highs.append(max(0.0, entry["wilson_95"][1] - entry["accuracy"]))
        ax.bar(xs, ys, width, yerr=[lows, highs], capsize=3, label=Path(model).name or model)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (Wilson 95 %)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
