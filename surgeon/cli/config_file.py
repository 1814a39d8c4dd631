"""``--config FILE`` for ``train`` and ``merge``: a YAML (or JSON) mapping of option names to values,
or the ``surgeon.json`` an earlier run wrote (its recorded settings are replayed). Flags given on the
command line override the file: the file's values become the command's defaults (click's
``default_map``), so nothing else in the command changes.

Keys are the long option names with or without dashes (``max-steps``, ``max_steps``, ``--max-steps``)
and the argument's name (``model``); lists are allowed where an option takes several values
(``reasoning: [a, b]``) or a comma-separated list (``modules: [attn, mlp]``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

# options a replayed surgeon.json must not carry over: they say how the earlier run was started, not
# what it computed (an output that exists stops the replay unless the user asks to overwrite it)
_NOT_REPLAYED = {"overwrite", "resume", "resume_anyway"}


def config_option(f: F) -> F:
    """The ``--config`` option; eager, so the file is read before any other parameter is."""
    return click.option(
        "--config", "config_file", metavar="FILE", expose_value=False, is_eager=True, callback=_load,
        help="Options from a YAML/JSON file (option names as keys; flags override it), or an output's surgeon.json "
        "to replay the run it records.",
    )(f)  # fmt: skip


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    from surgeon.errors import ConfigError

    values = read_config_file(value, ctx.command.name or "")
    ctx.default_map = {**(ctx.default_map or {}), **to_defaults(ctx.command, values, value)}
    if not ctx.default_map:
        raise ConfigError("config", f"{value} sets no option", "add option names as keys, e.g. max-steps: 100")


def read_config_file(path: str, command: str) -> dict[str, Any]:
    """The settings in ``path``: a mapping from a YAML/JSON file, or a surgeon.json's recorded
    ``config`` (which must come from the same command)."""
    import yaml

    from surgeon.errors import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError("config", f"{path} is not a file", "give a YAML file of options or an output's surgeon.json")
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        line = " ".join(str(e).split())[:200]
        raise ConfigError("config", f"{path} is not valid {'JSON' if file.suffix == '.json' else 'YAML'} ({line})", "fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} holds a {type(data).__name__}, not a mapping of options", "write one `option: value` per line")
    if "surgeon_version" in data and isinstance(data.get("config"), dict):
        recorded = data.get("command")
        if recorded != command:
            raise ConfigError(
                "config", f"{path} records a `surgeon {recorded}` run, not `surgeon {command}`", f"replay it with `surgeon {recorded} --config {path}`"
            )
        return {k: v for k, v in data["config"].items() if k not in _NOT_REPLAYED}
    return data


def to_defaults(command: click.Command, values: dict[str, Any], path: str) -> dict[str, Any]:
    """``values`` keyed by the command's parameter names, converted to what each parameter takes."""
    from surgeon.errors import ConfigError

    names: dict[str, click.Parameter] = {}
    negated: set[str] = set()  # --no-bias style names: their value is the flag's opposite
    for p in command.params:
        if p.name in (None, "config_file"):
            continue
        names[p.name] = p
        for opt in p.opts:
            names.setdefault(opt.lstrip("-").replace("-", "_"), p)
        for opt in p.secondary_opts:
            negated.add(opt.lstrip("-").replace("-", "_"))
            names.setdefault(opt.lstrip("-").replace("-", "_"), p)
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        param = names.get(name)
        if name in negated and isinstance(value, bool):
            value = not value
        if param is None:
            known = ", ".join(sorted(n.replace("_", "-") for n, p in names.items() if n == p.name))
            raise ConfigError("config", f"{path} sets {key!r}, which `surgeon {command.name}` does not have", f"use one of: {known}")
        if value is None:
            continue
        defaults[param.name] = _convert(param, value)  # type: ignore[index]
    return defaults


def _convert(param: click.Parameter, value: Any) -> Any:
    """Lists become a comma-separated string for an option that takes one value; a single value
    becomes a list for one that takes several."""
    if param.multiple or (param.nargs != 1):
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value
