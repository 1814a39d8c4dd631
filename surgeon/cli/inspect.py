"""``surgeon inspect CKPT``: what a checkpoint is and where its parts live."""

from __future__ import annotations

import click
from rich.table import Table

from surgeon.cli.group import example
from surgeon.cli.console import emit_json, human_bytes, human_count, out


@click.command(
    "inspect",
    epilog=example("surgeon inspect Qwen/Qwen2.5-VL-7B-Instruct", "surgeon inspect ./my-vlm --json"),
)
@click.argument("checkpoint")
@click.option("--revision", default=None, help="Branch, tag or commit, for Hub repo ids.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def command(checkpoint: str, revision: str | None, as_json: bool) -> None:
    """Describe CHECKPOINT (a local folder or a Hub repo id) from its config and tensor headers.

    Reads no weights (for a repo id, only config.json and the safetensors headers are fetched):
    prints the architecture, sizes, dtype, shards, and parameter counts split
    into language model / vision tower / projector / other.
    """
    from surgeon.hub.sources import open_checkpoint
    from surgeon.anatomy.inspect import inspect_checkpoint

    with open_checkpoint(checkpoint, revision, headers_only=True) as ckpt:
        report = inspect_checkpoint(ckpt)
    if as_json:
        emit_json(report.to_dict())
        return
    kind = "vision-language model" if report.kind == "vlm" else "text language model"
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    rows = [
        ("checkpoint", report.source),
        ("architecture", f"{report.architecture} ({report.model_type}), {kind}" if report.architecture else f"unknown (no config.json), {kind}"),
        ("language model", f"{report.lm_prefix}{report.layer_word}.* ({report.num_layers} layers), head: {report.lm_head or 'tied to embeddings'}"),
        ("hidden size", _known(report.hidden_size)),
        ("attention heads", "unknown" if report.num_attention_heads is None else
         f"{report.num_attention_heads} ({_known(report.num_key_value_heads)} KV heads, head dim {_known(report.head_dim)})"),
        ("vocab size", _known(report.vocab_size)),
        ("tied embeddings", "yes" if report.tied_embeddings else "no"),
        ("dtype", report.dtype if report.quantization is None else f"{report.dtype}, quantized ({report.quantization})"),
    ]
    if report.quantized:
        q = report.quantized
        left = ", ".join(f"{part} {n}" for part, n in q.get("not_quantized", {}).items()) or "none"
        rows.append(("quantized", f"{q['method']} ({q['format']}), {', '.join(q['scales'])}; {q['quantized_tensors']} weights quantized, "
                                  f"not quantized: {left}"))  # fmt: skip
    if report.cross_attention_layers:
        rows.append(("cross-attention", f"layers {', '.join(map(str, report.cross_attention_layers))} (image-only; not counted above)"))
    if report.placeholder_tokens:
        rows.append(("placeholder tokens", ", ".join(f"{k}={v}" for k, v in report.placeholder_tokens.items())))
    for key, value in rows:
        facts.add_row(key, str(value))
    out.print(facts)

    params = Table(title="parameters", title_justify="left")
    params.add_column("part")
    params.add_column("count", justify="right")
    params.add_column("share", justify="right")
    total = report.params["total"] or 1
    for part in ("language_model", "vision", "projector", "other", "total"):
        n = report.params[part]
        params.add_row(part.replace("_", " "), f"{n:,} ({human_count(n)})", f"{100 * n / total:.1f}%")
    out.print(params)

    shards = Table(title="shards", title_justify="left")
    shards.add_column("file")
    shards.add_column("tensors", justify="right")
    shards.add_column("size", justify="right")
    for s in report.shards:
        shards.add_row(s["file"], str(s["tensors"]), human_bytes(s["bytes"]))
    out.print(shards)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)


def _known(value: object) -> str:
    """A fact, or ``unknown`` where config.json (missing) would have said it."""
    return "unknown" if value is None else str(value)
