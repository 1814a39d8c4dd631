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
    """``-q``: warnings only; default: info; ``-v``: debug; ``-vv``: debug incl. transformers."""
    global _quiet, _verbose
    _quiet, _verbose = quiet, verbose
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    log = logging.getLogger("surgeon")
    log.handlers[:] = [RichHandler(console=err, show_time=False, show_path=False, markup=False)]
    log.setLevel(level)
    log.propagate = False
    if verbose < 2:
        import os

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
