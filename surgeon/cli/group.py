"""The click group class: errors become one line and an exit code, in this one place.

=========================================  ======  ====================================================
raised                                     exit    printed on stderr
=========================================  ======  ====================================================
``SurgeonError`` (the library's errors)    1       ``Error: <problem>; <what to do>``
``OSError`` (disk full, permissions)       1       ``Error: <strerror>: <file>; …``
``KeyboardInterrupt`` / SIGTERM            130/143 ``Error: interrupted; no output was written`` (or what is kept)
anything else                              1       ``Error: unexpected <Type>: <message>; …``
click usage errors                         2       click's own message
=========================================  ======  ====================================================

``SURGEON_DEBUG=1`` re-raises instead, with the full traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("SURGEON_DEBUG", "") not in ("", "0", "false", "False")


def error_line(exc: BaseException) -> str:
    """The one-line message for an exception (without the ``Error: `` prefix)."""
    from surgeon.errors import SurgeonError

    if isinstance(exc, SurgeonError):
        return exc.one_line()
    if isinstance(exc, MemoryError):
        return "out of memory; use a machine with more RAM or a smaller --shard-size / batch"
    if isinstance(exc, OSError):
        import errno

        where = f": {exc.filename}" if exc.filename else ""
        hint = {
            errno.ENOSPC: "free some disk space (or write elsewhere), then run the command again",
            errno.EDQUOT: "free some of your disk quota (or write elsewhere), then run the command again",
            errno.EACCES: "check the permissions of that path, or write elsewhere",
            errno.EPERM: "check the permissions of that path, or write elsewhere",
            errno.EROFS: "that file system is read-only: write elsewhere",
            errno.ENAMETOOLONG: "choose a shorter name or a shallower folder",
            errno.ENOENT: "check that the path exists",
            errno.EMFILE: "raise the open-file limit (ulimit -n), then run the command again",
        }.get(exc.errno or 0, "check the path, free disk space and permissions, then run the command again")
        return f"{exc.strerror or exc}{where}; {hint}"
    text = " ".join(str(exc).split()) or "no message"
    return f"unexpected {type(exc).__name__}: {text}; run with SURGEON_DEBUG=1 for the traceback and report it"


class SurgeonGroup(click.Group):
    """A click group that turns exceptions into ``Error: …`` lines and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        with _sigterm_as_interrupt():
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as exc:
            if debug_enabled():
                raise
            detail = getattr(exc, "detail", None) or "no output was written"
            click.echo(f"Error: interrupted; {detail}", err=True)
            sys.exit(128 + getattr(exc, "signum", 2))
        except Exception as exc:  # noqa: BLE001 — this is the one place errors are translated
            if debug_enabled():
                raise
            click.echo(f"Error: {error_line(exc)}", err=True)
            sys.exit(1)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, Slurm preemption, ``docker stop``) stops a command the way Ctrl-C
    does: the same clean-up (no temporary folder left), the same message, exit 143."""
    import signal
    import threading

    from surgeon.errors import Interrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class DtypeName(click.ParamType):
    """A dtype option: any spelling of ``surgeon.dtypes`` (bf16, bfloat16, BF16 …) among ``allowed``,
    or one of ``extra`` (auto, no); shown and passed on by its short name."""

    name = "dtype"

    def __init__(self, allowed: tuple[str, ...] = ("fp32", "bf16", "fp16"), extra: tuple[str, ...] = ()) -> None:
        self.allowed, self.extra = allowed, extra

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # type: ignore[override]
        return "[" + "|".join((*self.extra, *self.allowed)) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from surgeon import dtypes
        from surgeon.errors import ConfigError

        try:
            return dtypes.short(value, param.name if param and param.name else "dtype", self.allowed, self.extra)
        except ConfigError as e:
            self.fail(e.one_line(), param, ctx)


def example(*lines: str) -> str:
    """An epilog that ends a command's help with runnable example(s), kept unwrapped."""
    body = "\n".join(f"  {line}" for line in lines)
    return f"\b\nExample:\n{body}"


def build(cls: type[T], options: dict[str, Any], rest: bool = False) -> T:
    """``cls(**options)`` for the config dataclass ``cls``: every command builds its config this way,
    so a new option is one field and one ``click.option`` line. With ``rest``, options that are not
    fields stay in ``options`` (for the library call beside the config); otherwise there must be none."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    config = cls(**{k: options.pop(k) for k in list(options) if k in names})
    if options and not rest:
        raise TypeError(f"options without a {cls.__name__} field: {', '.join(options)}")
    return config


SELECTION_HELP = {
    "modules": "Module families: attn, mlp, norm, final_norm, embed, head, full, and re:REGEX on LM-relative names "
    "(e.g. re:layers\\.1\\d\\.mlp), comma-separated.",
    "layers": "Decoder layers to include, e.g. 0-13,20 (default: all). Tensors outside the layers are chosen by --modules alone.",
    "skip_first": "Leave out the first N decoder layers.",
    "bias": "Include bias tensors of the selected modules (default: yes).",
}


def selection_options(modules: str, layers_note: str = "") -> Callable[[F], F]:
    """``--modules``, ``--layers``, ``--skip-first`` and ``--bias/--no-bias``: which paired
    language-model tensors ``prior`` and ``merge`` act on (the ``Selection`` fields of their configs)."""
    options = [
        click.option("--modules", default=modules, show_default=True, help=SELECTION_HELP["modules"]),
        click.option("--layers", default=None, help=SELECTION_HELP["layers"] + layers_note),
        click.option("--skip-first", default=0, show_default=True, type=int, help=SELECTION_HELP["skip_first"]),
        click.option("--bias/--no-bias", default=True, help=SELECTION_HELP["bias"]),
    ]

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate
