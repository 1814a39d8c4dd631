"""``--push-to-hub ORG/NAME`` for every command that writes a folder; adopting it takes two lines::

    @click.command("merge", epilog=...)
    ...
    @push_to_hub_option                      # 1: the option (checked before any work starts)
    def command(output: str, ...) -> None:
        ...                                  # write the folder (through output_folder)
        push_written(output)                 # 2: upload it; does nothing without --push-to-hub

The option is not passed to the command function (it lives in the click context), so the
command's config dataclass and ``surgeon.json`` stay free of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from surgeon.cli.console import err, human_bytes

_KEY = "surgeon.push_to_hub"
F = TypeVar("F", bound=Callable[..., Any])


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not ctx.resilient_parsing:
        from surgeon.hub.client import check_can_push

        check_can_push(value)  # bad id, offline, not logged in: fail now, not after the work
    ctx.meta[_KEY] = value
    return value


def push_to_hub_option(f: F) -> F:
    """The ``--push-to-hub ORG/NAME`` option."""
    return click.option(
        "--push-to-hub",
        metavar="ORG/NAME",
        default=None,
        expose_value=False,
        callback=_remember,
        help="After writing the output, upload it with a model card built from surgeon.json to this Hub repo "
        "(created when missing; token from HF_TOKEN or `hf auth login`).",
    )(f)


def pushing() -> str | None:
    """The ``--push-to-hub`` repo of the running command, if any."""
    return click.get_current_context().meta.get(_KEY)


def push_written(folder: str | Path) -> Any:
    """Push ``folder`` when the current command got ``--push-to-hub``; returns the PushResult or None.

    A failed push keeps the (complete) folder and says how to push it again.
    """
    repo = pushing()
    if not repo:
        return None
    from surgeon.errors import HubError, SurgeonError
    from surgeon.publish.push import PushConfig, push_folder

    try:
        result = push_folder(folder, PushConfig(repo=repo))
    except SurgeonError as e:
        again = f"{folder} is complete: push it later with `surgeon push {folder} --repo {repo}`"
        raise HubError(e.problem, f"{e.hint}; {again}" if e.hint else again, getattr(e, "status", None)) from None
    err.print(f"pushed {len(result.files)} files ({human_bytes(sum(n for _, n in result.files))}) to {result.url}", highlight=False)
    return result
