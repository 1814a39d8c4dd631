"""Console output for commands: results on stdout, progress and logs on stderr."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

out = Console(soft_wrap=True)
err = Console(stderr=True)
_quiet = False
_verbose = 0


def setup_logging(verbose: int, quiet: bool) -> None:
    """``-q``: nothing on stderr but warnings and errors (no status lines, notes, progress bars or
    step lines; results on stdout stay); default: info; ``-v``: debug; ``-vv``: debug incl.
    transformers. Hub transfers draw their bars only on a terminal, print a line every 30 s off one
    (``surgeon.hub.transfers``), and show nothing with ``-q``."""
    import os

    global _quiet, _verbose
    _quiet, _verbose = quiet, verbose
    err.quiet = quiet
    from surgeon.hub.transfers import report_to

    if quiet or not err.is_terminal:  # Hub and datasets bars: on a terminal only, never with -q
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # off a terminal, a line every 30 s while a Hub transfer lasts instead of a bar
    report_to(None if quiet or err.is_terminal else lambda line: err.print(f"surgeon: {line}", soft_wrap=True, highlight=False, markup=False))
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    log = logging.getLogger("surgeon")
    warnings = Console(stderr=True) if quiet else err  # warnings still show with -q
    log.handlers[:] = [RichHandler(console=warnings, show_time=False, show_path=False, markup=False)]
    log.setLevel(level)
    log.propagate = False
    if verbose < 2:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def quiet_transformers() -> None:
    """Hide transformers' own weight-loading/saving bars unless -vv (downloads keep theirs)."""
    if _verbose < 2:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def emit_json(data: Any) -> None:
    """Machine-readable result on stdout."""
    click.echo(json.dumps(data, indent=2, default=str))


@contextmanager
def progress() -> Iterator[Any]:
    """A ``(task, done, total)`` callback that draws a rich progress bar on stderr."""
    if _quiet or not err.is_terminal:
        yield lambda task, done, total: None
        return
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err, transient=True,
    )  # fmt: skip
    tasks: dict[str, Any] = {}

    def update(task: str, done: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total)
        bars.update(tasks[task], completed=done, total=total)

    with bars:
        yield update


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
