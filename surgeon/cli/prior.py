"""``surgeon prior --reasoning X --vlm Y -o OUT``: compute a DRIFT reasoning prior."""

from __future__ import annotations

import click
from rich.table import Table

from surgeon.cli.group import DtypeName, build, example, selection_options
from surgeon.cli.push_option import push_to_hub_option, push_written
from surgeon.cli.console import emit_json, err, human_bytes, out, progress


@click.command(
    "prior",
    epilog=example(
        "surgeon prior --reasoning deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --vlm Qwen/Qwen2.5-VL-7B-Instruct -o r1-prior",
        "surgeon prior --reasoning ./r1 --base ./qwen2.5-math --vlm ./qwen2.5-vl -o prior2 --modules attn,mlp,norm --json",
    ),
)
@click.option("--reasoning", required=True, help="The reasoning LLM (folder or Hub repo id).")
@click.option("--vlm", required=True, help="The VLM the prior is for, as it is before fine-tuning.")
@click.option("-o", "--output", required=True, help="Output folder for the prior.")
@click.option("--base", default=None, help="Two-model mode: Δ = reasoning − base instead of reasoning − VLM.")
@selection_options(modules="attn,mlp")
@click.option("--dtype", type=DtypeName(), default=None, help="Storage dtype of Δ (default: the VLM's dtype).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@push_to_hub_option
@click.option("--json", "as_json", is_flag=True, help="Print the result (all statistics) as JSON on stdout.")
def command(as_json: bool, **options: object) -> None:
    """Compute the DRIFT reasoning prior Δ = θ(reasoning) − θ(VLM) on the VLM's language model.

    Pairs tensors by name across layouts (vision tower and projector never), computes Δ in fp32
    one block at a time, stores it raw under the VLM's tensor names, and prints per-layer
    distance and cosine statistics (all of them go to surgeon.json). Training with the prior
    applies the optional normalisation Δ·‖θ_VLM‖/‖Δ‖ itself.
    """
    from surgeon.drift.prior import PriorConfig, compute_prior

    config = build(PriorConfig, options)
    with progress() as tick:
        result = compute_prior(config, tick)
    push_written(result.output)
    if as_json:
        emit_json(result.to_dict())
        return
    for note in result.notes:
        err.print(f"note: {note}", markup=False)
    c = result.counts
    out.print(
        f"prior ({result.mode}) of {c['selected']} tensors ({result.selection}) written to {result.output} "
        f"({human_bytes(result.bytes)}, {result.dtype})",
        markup=False,
    )
    out.print(
        f"paired {c['matched']} language-model tensors, {c['skipped']} not selected, {c['unmatched_lm']} without a counterpart; "
        f"{c['vision']} vision/projector tensors left alone",
        markup=False,
    )
    out.print(_table("per layer", "layer", result.layers))
    out.print(_table("per module family", "family", result.families))
    t = result.total
    out.print(f"total: ‖Δ‖/‖θ_VLM‖ = {t['relative_distance']:.4f}, cos(θ_reasoning, θ_VLM) = {t['cosine']:.6f}")


def _table(title: str, key: str, rows: list[dict]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in (key, "tensors", "‖Δ‖", "‖θ_VLM‖", "‖Δ‖/‖θ_VLM‖", "cos(θ_R, θ_VLM)"):
        table.add_column(col, justify="left" if col == key else "right")
    for r in rows:
        table.add_row(
            str(r[key]), str(r["tensors"]), f"{r['delta_norm']:.4g}", f"{r['vlm_norm']:.4g}",
            f"{r['relative_distance']:.4f}", f"{r['cosine']:.6f}",
        )  # fmt: skip
    return table
