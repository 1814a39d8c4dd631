"""``surgeon inject-iada MODEL``: add IADA depth-aggregation blocks to a saved model."""

from __future__ import annotations

import click
from rich.table import Table

from surgeon.cli.group import build, example
from surgeon.cli.push_option import push_to_hub_option, push_written
from surgeon.cli.console import emit_json, human_count, out


@click.command(
    "inject-iada",
    epilog=example(
        "surgeon inject-iada ./qwen3-vl-2b -o ./qwen3-vl-2b-iada",
        "surgeon inject-iada Qwen/Qwen2.5-VL-7B-Instruct --block-size 4 --mode fixed --dry-run",
    ),
)
@click.argument("model")
@click.option("-o", "--output", default=None,
              help="Output folder (default: MODEL-iada beside a local MODEL, ./NAME-iada for a repo id).")
@click.option("--block-size", default=7, show_default=True, help="S: a boundary after every S decoder layers.")
@click.option("--rank", default=4, show_default=True,
              help="r: rank of the per-modality query projections D (r×d) and U (d×r).")
@click.option("--depth", default="all", show_default=True,
              help="n_d: previous boundaries each boundary reads (boundary 0 = embeddings), or 'all'.")
@click.option("--mode", type=click.Choice(["adaptive", "fixed"]), default="adaptive", show_default=True,
              help="adaptive: weights over depth from the token's state; fixed: learned input-independent "
                   "depth logits (the paper's diagnostic baseline).")
@click.option("--gate", type=click.Choice(["channel", "scalar"]), default="channel", show_default=True,
              help="Gate of the residual add: per channel (d values) or one scalar.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of D's random init (not specified by the paper; surgeon default).")
@click.option("--replace", is_flag=True, help="MODEL already has IADA blocks: replace them instead of failing.")
@click.option("--dry-run", is_flag=True,
              help="Only print the boundaries and parameter count (reads config.json alone).")
@click.option("--revision", default=None, help="Branch, tag or commit, for Hub repo ids.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@push_to_hub_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def command(model: str, as_json: bool, **options: object) -> None:
    """Add IADA blocks (input-adaptive depth aggregation) to MODEL's language model.

    \b
    At every boundary (after each S decoder layers) a token's hidden state gets a gated mix of
    its own states at the previous boundaries, weighted by a low-rank, modality-specific query
    (docs/methods.md §3). The paper publishes only its abstract, so every default is surgeon's:
    S=7, r=4, n_d=all and a per-channel gate reproduce its 0.14M parameters on Qwen3-VL-2B;
    D ~ N(0, 1/d), RMS epsilon 1e-6, fp32 aggregation and caching each boundary's state before
    its own aggregation are not specified by the paper. The gate starts at 0, so the output
    computes exactly what MODEL computes until it is fine-tuned.

    \b
    The output loads with AutoModelForImageTextToText / AutoModelForCausalLM
    .from_pretrained(OUT, trust_remote_code=True) without surgeon installed, or with
    surgeon.load_model(OUT); without trust_remote_code it loads as the base model. Weight files
    are hard-linked (copied across filesystems); MODEL is never modified.
    """
    from surgeon.modules.iada import IadaConfig, inject_iada

    config = build(IadaConfig, options, rest=True)
    result = inject_iada(model, config=config, **options)  # type: ignore[arg-type]
    if result.output is not None:
        push_written(result.output)
    if as_json:
        emit_json(result.to_dict())
        return
    plan = result.plan
    title = f"IADA on {plan.architecture}: {plan.num_layers} layers, hidden {plan.hidden_size}"
    table = Table(title=title, title_justify="left")
    for col in ("boundary", "after layer", "reads boundaries", "params"):
        table.add_column(col, justify="right" if col != "reads boundaries" else "left")
    for b in plan.boundaries:
        table.add_row(str(b.index), str(b.after_layers), ", ".join(map(str, b.sources)), f"{b.params:,}")
    out.print(table)
    out.print(
        f"added parameters: {plan.params:,} ({human_count(plan.params)})  "
        f"mode {config.mode}, gate {config.gate}, rank {config.rank}"
    )
    if result.output is None:
        out.print("dry run: nothing written")
    else:
        linked = len(result.files.get("linked", []))
        out.print(f"wrote {result.output} ({linked} weight file(s) linked, IADA weights in surgeon-iada.safetensors)")
