"""``surgeon eval MODEL… --set NAME=DATA… -o REPORT``: the reasoning tax on the user's own models."""

from __future__ import annotations

import click
from rich.table import Table

from surgeon.cli.group import DtypeName, build, example
from surgeon.cli.console import emit_json, err, out, progress, quiet_transformers


@click.command(
    "eval",
    epilog=example(
        "surgeon demo --workdir demo/",
        "surgeon eval demo/vlm demo/trained --set shapes=demo/data/data.jsonl -o demo/tax --max-new-tokens 32",
        "surgeon eval Qwen/Qwen2.5-VL-7B-Instruct sft/ drift/ --set gsm=gsm8k.jsonl --set charts=charts.parquet -o tax/ --limit 500",
    ),
)
@click.argument("models", nargs=-1, required=True)
@click.option("--set", "sets", multiple=True, metavar="NAME=DATA",
              help="An evaluation set: any data `surgeon train` reads (JSONL, parquet, save_to_disk, Hub id); repeatable.")
@click.option("-o", "--output", default=None, help="Report folder: results.jsonl, summary.json, tax.png.")
@click.option("--limit", type=int, default=None, help="The first N items of each set.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts generated together (left-padded).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--answer-regex", default=None, help="Extract answers with this regex (group 1, else the match) instead of the built-in rules.")
@click.option("--perception-regex", default=None, help="Perception spans of the references by regex instead of <perception> tags.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1… (auto: a GPU if any).")
@click.option("--dtype", type=DtypeName(extra=("auto",)), default="auto", show_default=True, help="auto: float32 on the CPU, the checkpoint's on a GPU.")
@click.option("--bootstrap", type=int, default=2000, show_default=True, help="Resamples of the paired bootstrap interval.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--lm-eval", default=None, metavar="TASKS", help="Also run lm-eval-harness tasks (comma-separated; pip install 'surgeon[eval]').")
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def command(models: tuple[str, ...], sets: tuple[str, ...], as_json: bool, **options: object) -> None:
    """Measure what each of MODELS answers on each --set, scored alike, and compare every model
    with the first.

    \b
    MODELS: local folders or Hub ids: a VLM, a text LLM, a merged or fully fine-tuned output, an
    IADA folder, a LoRA or Image-LoRA adapter folder (on its base). Each row's reference is its last
    assistant message (or its `answer` field); references and generations go through the same
    extraction (<answer>X</answer>, \\boxed{X}, "Answer: X", "The answer is X", else the last
    number), numbers compared by value. Where references mark <perception> spans, saying them is
    scored too. Greedy generation with the model's chat template, one model in memory at a time.
    Prints accuracies with Wilson 95 % intervals, and for every model after the first the paired
    difference from the first with McNemar's exact p and a bootstrap interval.
    """
    from surgeon.evaluation.run import EvalConfig, evaluate

    config = build(EvalConfig, {**options, "models": models, "sets": sets})
    quiet_transformers()
    with progress() as bar:
        report = evaluate(config, progress=bar, status=lambda text: err.print(f"surgeon eval: {text}", soft_wrap=True, highlight=False, markup=False))
    if as_json:
        emit_json(report.summary)
        return
    _table(report.summary, list(config.models))
    for note in report.summary.get("notes", []):
        out.print(f"note: {note}", highlight=False)
    if report.output:
        out.print(f"wrote {report.output} (results.jsonl, summary.json{', tax.png' if not any('tax.png' in n for n in report.summary['notes']) else ''})")


def _table(summary: dict, models: list[str]) -> None:
    sets = sorted({s for m in summary["models"].values() for s in m})
    table = Table(title="accuracy (Wilson 95 %); Δ against the first model (McNemar p)", title_justify="left")
    table.add_column("model")
    for name in sets:
        table.add_column(name, justify="right")
    for model in models:
        cells = []
        for name in sets:
            entry = summary["models"].get(model, {}).get(name)
            if entry is None:
                cells.append("—")
                continue
            lo, hi = entry["wilson_95"]
            cell = f"{entry['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] n={entry['n']}"
            if "perception" in entry:
                cell += f"\nperception {entry['perception']['accuracy']:.1%}"
            comparison = summary["comparisons"].get(model, {}).get(name)
            if comparison:
                cell += f"\nΔ {comparison['difference']:+.1%} (p={comparison['p_value']:.3g})"
            cells.append(cell)
        table.add_row(model, *cells)
    out.print(table)
