"""``surgeon diagnose DATA --model M``: the perception share of supervised tokens and of the loss."""

from __future__ import annotations

import click
from rich.table import Table

from surgeon.cli.group import DtypeName, build, example
from surgeon.cli.console import emit_json, out, progress


@click.command(
    "diagnose",
    epilog=example(
        "surgeon diagnose data.jsonl --model Qwen/Qwen2.5-VL-7B-Instruct --max-samples 500",
        "surgeon diagnose data.jsonl --model ./my-vlm --perception-regex '^(.*?\\.)' --json",
    ),
)
@click.argument("data")
@click.option("--model", "-m", required=True, help="Model folder or Hub repo id (processor and loss).")
@click.option("--batch-size", default=4, show_default=True, help="Samples per forward pass.")
@click.option("--max-samples", type=int, default=None, help="Use only the first N good samples.")
@click.option("--max-length", type=int, default=2048, show_default=True, help="Truncate to N tokens, as training does.")
@click.option(
    "--perception-regex",
    default=None,
    help="Regex marking the perception span in assistant text (its group 1 if it has one), instead of tags.",
)
@click.option("--skip-bad-lines", is_flag=True, help="Skip and count bad lines instead of stopping.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1… (auto: GPU if any).")
@click.option(
    "--dtype",
    type=DtypeName(extra=("auto",)),
    default="auto",
    show_default=True,
    help="auto: float32 on CPU, the checkpoint's dtype on GPU.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def command(as_json: bool, **options: object) -> None:
    """Measure how much of DATA's supervision is perception, under MODEL.

    \b
    DATA is JSONL (or a JSON array), one conversation a line, in TRL's format
    ("messages" with {"type": "image", "image": path} parts) or ShareGPT/LLaMA-Factory's
    ("conversations"/"messages" with <image> in the text and an "images" list); image paths
    are relative to DATA. In assistant turns <perception>…</perception> marks what the image
    shows; every other supervised token is reasoning.

    Reports the perception share of the supervised tokens and of the model's cross-entropy on
    them (the paper reports ≈2.5% of tokens and ≈1.3% of the loss on its data), and how many
    samples were read, used and skipped. A bad line stops the run naming it, unless
    --skip-bad-lines.
    """
    from surgeon.perception.diagnose import DiagnoseConfig, diagnose

    config = build(DiagnoseConfig, options)
    with progress() as update:
        report = diagnose(config, update)
    if as_json:
        emit_json(report.to_dict())
        return
    stats = report.stats
    skipped = sum(stats["skipped"].values())
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    read = f"{stats['read']} read, {stats['used']} used, {skipped} skipped, {stats['images']} images"
    share = f"{100 * report.token_share:.1f}% of supervised tokens"
    p_loss, r_loss = report.mean_perception_loss, report.mean_reasoning_loss
    shown = [f"{name} {loss:.3f}" for name, loss in (("perception", p_loss), ("reasoning", r_loss)) if loss == loss]  # not nan
    means = ", ".join(shown) + " nats a token" if shown else "—"
    rows = [
        ("data", f"{report.data}: {read}"),
        ("model", report.model),
        ("supervised tokens", f"{report.supervised_tokens:,}"),
        ("perception tokens", f"{report.perception_tokens:,} ({share})"),
        ("perception loss", f"{100 * report.loss_share:.1f}% of the supervised loss"),
        ("mean loss", means),
    ]
    for reason, n in stats["skipped"].items():
        shown = stats["skipped_lines"][reason]
        lines = ", ".join(map(str, shown)) + (", …" if n > len(shown) else "")
        rows.append(("skipped", f"{n} {reason} (line{'s' if n > 1 else ''} {lines})"))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    if report.perception_tokens == 0:
        out.print("no perception tokens: mark them with <perception>…</perception> or --perception-regex")
