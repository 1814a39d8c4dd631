"""A model folder's chat template rendered under bounds on the text it writes and the time it takes.

    with bounded(chars=1_000_000, seconds=10):
        text = processor.apply_chat_template(messages, tokenize=False)

A chat template is code that comes with a model folder. transformers runs it in jinja's sandbox,
which keeps it from the machine but not from loops: ``{% for i in range(100000) %}{% for j in
range(100000) %}x…`` writes 10¹⁰ characters. Under ``bounded`` the output is collected piece by
piece and the render stops with ``TemplateTooCostly`` once it passes ``chars`` characters or
``seconds`` (the time limit is a timer signal, so it holds only on the main thread of a process;
DataLoader workers are processes, each with its own main thread).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

MAX_SECONDS = 20.0  # one render (templates take milliseconds)
MIN_CHARS = 1 << 20  # a render may always write this much


class TemplateTooCostly(Exception):
    """A render that wrote more than its bound, or took longer."""


_LIMITS: ContextVar[tuple[int, float] | None] = ContextVar("surgeon_template_limits", default=None)


def _bounded_concat(pieces: Iterable[str]) -> str:
    """jinja's ``"".join`` of the rendered pieces, counting characters and time as they come."""
    limits = _LIMITS.get()
    if limits is None:
        return "".join(pieces)
    chars, deadline = limits
    out: list[str] = []
    size = 0
    for piece in pieces:
        size += len(piece)
        out.append(piece)
        if size > chars:
            raise TemplateTooCostly(f"it wrote more than {chars:,} characters for one conversation")
        if time.monotonic() > deadline:
            raise TemplateTooCostly(f"it took longer than {MAX_SECONDS:.0f} s for one conversation")
    return "".join(out)


def install(template: str | None) -> None:
    """Make the compiled environment of ``template`` (transformers' cached one) collect its output
    through ``_bounded_concat``; unbounded outside ``bounded``. A transformers that compiles
    templates elsewhere keeps its own join (the time bound still holds)."""
    if not template:
        return
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(template).environment
    except Exception:  # noqa: BLE001 - a private helper that may move; the time bound still applies
        return
    environment.concat = _bounded_concat  # type: ignore[attr-defined]


@contextlib.contextmanager
def bounded(chars: int, seconds: float = MAX_SECONDS) -> Iterator[None]:
    """Render inside this block at most ``chars`` characters (at least ``MIN_CHARS``) in at most
    ``seconds``; raises ``TemplateTooCostly`` otherwise."""
    token = _LIMITS.set((max(chars, MIN_CHARS), time.monotonic() + seconds))
    timer = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    previous = None
    if timer:
        def expire(signum: int, frame: object) -> None:
            raise TemplateTooCostly(f"it took longer than {seconds:.0f} s for one conversation")

        if signal.getitimer(signal.ITIMER_REAL)[0] == 0:  # never take over a timer someone else set
            previous = signal.signal(signal.SIGALRM, expire)
            signal.setitimer(signal.ITIMER_REAL, seconds)
        else:
            timer = False
    try:
        yield
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)  # type: ignore[arg-type]
        _LIMITS.reset(token)
