"""Typed errors raised by the library.

Every error renders as one line: what is wrong, then what to do next. The command layer
(`surgeon.cli`) prints that line as ``Error: …`` and exits with status 1; it never shows a
traceback unless ``SURGEON_DEBUG=1``. The attributes carry the data the message was built from, so
callers of the library can react without parsing text.
"""

from __future__ import annotations

from collections.abc import Iterable


class SurgeonError(Exception):
    """Base class. ``str(err)`` is ``"<problem>; <hint>"`` on one line."""

    def __init__(self, problem: str, hint: str | None = None) -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem if not self.hint else f"{self.problem}; {self.hint}"
        return " ".join(text.split())


class CheckpointError(SurgeonError):
    """A model folder or repo that cannot be read: missing, empty, corrupt, pickle-only."""

    def __init__(self, source: str, problem: str, hint: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {problem}", hint)


class LayoutError(SurgeonError):
    """Tensor names that surgeon cannot place into language model / vision / projector."""

    def __init__(self, source: str, problem: str, found: Iterable[str] = (), hint: str | None = None):
        self.source = source
        self.found = sorted(found)
        shown = ", ".join(self.found[:12]) + (", …" if len(self.found) > 12 else "")
        detail = f"{problem} (found: {shown})" if self.found else problem
        super().__init__(f"{source}: {detail}", hint)


class OutputExistsError(SurgeonError):
    """The output folder exists and is not empty."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"output folder {path} already exists and is not empty",
            "choose another output or pass --overwrite to replace it",
        )


class OutputBusyError(SurgeonError):
    """Another run is writing the same output right now."""

    def __init__(self, path: str, owner: str = "") -> None:
        self.path = path
        who = f" (process {owner})" if owner.isdigit() else ""
        super().__init__(
            f"another surgeon run{who} is writing {path} right now",
            "wait for it to finish, or choose another output",
        )


class ConfigError(SurgeonError):
    """An option value that cannot work. Speaks of the config field, not the flag."""

    def __init__(self, field: str, problem: str, hint: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}", hint)


class SelectionError(SurgeonError):
    """A pattern or preset that matched nothing. Lists what was available."""

    def __init__(self, what: str, pattern: str, available: Iterable[str], why: str | None = None) -> None:
        self.pattern = pattern
        self.available = sorted(set(available))
        shown = ", ".join(self.available[:20]) + (", …" if len(self.available) > 20 else "")
        super().__init__(
            f"{what} {pattern!r} matched nothing" + (f" ({why})" if why else ""),
            f"available: {shown}" if self.available else "nothing is available to select",
        )


class AlignmentError(SurgeonError):
    """Two checkpoints whose tensors cannot be paired (shape mismatches, nothing in common)."""

    def __init__(self, problem: str, examples: Iterable[str] = (), hint: str | None = None) -> None:
        self.examples = list(examples)
        shown = "; ".join(self.examples[:3])
        super().__init__(f"{problem} (e.g. {shown})" if shown else problem, hint)


class DataError(SurgeonError):
    """A dataset file or sample that cannot be used; names the file and line when known."""

    def __init__(self, where: str, problem: str, hint: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {problem}", hint)


class HubError(SurgeonError):
    """A Hugging Face Hub request that failed (auth, not found, rate limit, network)."""

    def __init__(self, problem: str, hint: str | None = None, status: int | None = None) -> None:
        self.status = status
        super().__init__(problem, hint)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT: Ctrl-C; SIGTERM: ``timeout``, Slurm preemption,
    ``docker stop``). ``detail`` says what is left, e.g. the checkpoint ``--resume`` continues from."""

    def __init__(self, signum: int = 2, detail: str | None = None) -> None:
        self.signum = signum
        self.detail = detail
        super().__init__(detail or "interrupted")
