"""Progress of Hub transfers where no bar can be drawn (stderr not a terminal: Slurm, ``nohup``, CI).

On a terminal ``huggingface_hub`` draws its own bars; with ``-q`` nothing is shown; otherwise the
command line installs a reporter (``report_to``) and every download or upload surgeon starts is
wrapped in ``heartbeat``: a line every ``INTERVAL`` seconds while it lasts (with the bytes in the
cache so far for downloads) and one when a transfer that was reported ends. Standard library only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

INTERVAL = 30.0  # seconds between lines
_reporter: Callable[[str], None] | None = None


def report_to(reporter: Callable[[str], None] | None) -> None:
    """Send transfer lines to ``reporter`` (None: none)."""
    global _reporter
    _reporter = reporter


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f} TB"


@contextmanager
def heartbeat(what: str, measure: Callable[[], int] | None = None) -> Iterator[None]:
    """Report ``what`` (``"downloading org/name"``) every INTERVAL seconds while the block runs."""
    reporter = _reporter
    if reporter is None:
        yield
        return
    stop, start, beats = threading.Event(), time.monotonic(), [0]

    def beat() -> None:
        while not stop.wait(INTERVAL):
            so_far = f", {_bytes(measure())} so far" if measure is not None else ""
            reporter(f"{what}{so_far} (elapsed {_clock(time.monotonic() - start)})")
            beats[0] += 1

    thread = threading.Thread(target=beat, name="surgeon-transfer-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if beats[0]:
            reporter(f"{what}: done in {_clock(time.monotonic() - start)}")


def cache_bytes(repo_id: str, repo_type: str = "model") -> Callable[[], int]:
    """A measure of a repo's download so far: the bytes of its blobs in the Hugging Face cache
    (unfinished ``.incomplete`` files included)."""

    def measure() -> int:
        from huggingface_hub import constants

        blobs = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "blobs"
        try:
            return sum(p.stat().st_size for p in blobs.iterdir())
        except OSError:
            return 0

    return measure
