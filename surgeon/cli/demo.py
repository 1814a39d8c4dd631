"""``surgeon demo``: run the pipeline on tiny models it builds itself."""

from __future__ import annotations

import dataclasses
import tempfile
import time

import click
from rich.table import Table

from surgeon.cli.group import example
from surgeon.cli.console import emit_json, err, out, quiet_transformers


@click.command(
    "demo",
    epilog=example("surgeon demo", "surgeon demo --workdir ./surgeon-demo --hub local", "surgeon demo --hub http://127.0.0.1:8999"),
)
@click.option("--workdir", default=None, help="Folder for the demo's outputs (default: a new temporary folder).")
@click.option("--overwrite", is_flag=True, help="Reuse a non-empty --workdir, replacing the demo's own folders.")
@click.option(
    "--hub",
    default=None,
    metavar="local|URL",
    help="Push the trained model to a local stand-in of the Hub: 'local' starts one for the demo, a URL names one "
    "already running (python -m surgeon.demo.hub_standin --port 8999). Default: a dry run that sends nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the steps (name, output, summary, seconds) as JSON on stdout.")
def command(workdir: str | None, overwrite: bool, hub: str | None, as_json: bool) -> None:
    """Build a tiny VLM, a reasoning LLM and a small dataset, then run every surgeon step on them:

    \b
    inspect → prior → merge → inject-iada → score-heads → train (DRIFT + IADA + dynamic
    perception/reasoning weighting) → push.

    Runs on CPU in well under a minute; every step's output stays in the work folder to look at.
    """
    from surgeon.demo.pipeline import run_demo

    work = workdir or tempfile.mkdtemp(prefix="surgeon-demo-")
    steps = run_demo(work, overwrite=overwrite, hub=hub)
    err.print(f"surgeon demo: working in {work}")
    summary = Table(title="surgeon demo", title_justify="left")
    for col in ("step", "wrote", "what", "seconds"):
        summary.add_column(col, justify="right" if col == "seconds" else "left")
    start = time.perf_counter()
    quiet_transformers()
    done = []
    for step in steps:
        err.print(f"[bold green]✓[/] {step.name}: {step.summary}")
        summary.add_row(step.name, step.output, step.summary, f"{step.seconds:.1f}")
        done.append(dataclasses.asdict(step))
    if as_json:
        emit_json({"workdir": str(work), "steps": done})
        return
    out.print(summary)
    out.print(f"done in {time.perf_counter() - start:.1f} s; outputs in {work}")
