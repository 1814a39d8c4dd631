"""Markdown tables for model cards: scalars, per-layer records, and nested mappings.

    table(["statistic", "value"], [["tensors", 196], ["mean cosine", 0.98713]])
    stats_markdown({"tensors": 196, "layers": [{"layer": 0, "norm": 1.5}, ...]})

Floats print with 4 significant digits, ``|`` is escaped, and a table stops after ``MAX_ROWS`` rows
with a line saying how many more are in ``surgeon.json``.
"""

from __future__ import annotations

from typing import Any

MAX_ROWS = 100


def _nested(values: list) -> bool:
    return any(isinstance(v, (dict, list)) for v in values)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif value is None:
        text = "—"
    elif isinstance(value, list) and not _nested(value):
        text = ", ".join(_cell(v) for v in value) if len(value) <= 8 else f"{len(value)} values"
    elif isinstance(value, (dict, list)):
        text = f"{len(value)} entries"
    else:
        text = str(value)
    return " ".join(text.replace("|", "\\|").split())


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; at most MAX_ROWS rows."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        lines.append(f"\n… {len(rows) - MAX_ROWS} more rows in `surgeon.json`.")
    return "\n".join(lines)


def flatten(value: dict, prefix: str = "") -> dict[str, Any]:
    """Small mappings of scalars folded into dotted keys: {"drift": {"alpha": 1}} -> {"drift.alpha": 1}."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()) and len(v) <= 12:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def records_table(rows: list[dict], first: str | None = None) -> str:
    """One row per record, one column per key (``first`` leading)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if first:
        columns = [first] + [c for c in columns if c != first]
    return table(columns, [[r.get(c) for c in columns] for r in rows])


def stats_markdown(stats: dict) -> str:
    """Statistics as Markdown: scalars in one table, per-layer lists and mappings in their own."""
    flat = flatten(stats)
    scalars = [[k, v] for k, v in flat.items() if not isinstance(v, (dict, list)) or (isinstance(v, list) and not _nested(v))]
    parts = [table(["statistic", "value"], scalars)] if scalars else []
    for key, value in flat.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            parts.append(f"**{key}**\n\n" + records_table(value))
        elif isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
            parts.append(f"**{key}**\n\n" + records_table([{key: k, **flatten(v)} for k, v in value.items()], key))
        elif isinstance(value, dict) and value:
            parts.append(f"**{key}**\n\n" + table(["", "value"], [[k, v] for k, v in flatten(value).items()]))
    return "\n\n".join(parts)
