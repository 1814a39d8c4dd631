"""``surgeon merge --reasoning X --vlm Y -o OUT --method M``: the merge baselines DRIFT is compared with."""

from __future__ import annotations

import click
from rich.table import Table

from surgeon.commands._cli import example
from surgeon.commands._hub import push_to_hub_option, push_written
from surgeon.commands._console import emit_json, err, human_bytes, out, progress
from surgeon.commands.prior import SELECTION_HELP

METHOD_NAMES = ["linear", "task-arithmetic", "ties", "dare-linear", "dare-ties", "layer-swap"]


@click.command(
    "merge",
    epilog=example(
        "surgeon merge --reasoning deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --vlm Qwen/Qwen2.5-VL-7B-Instruct -o merged --method ties",
        "surgeon merge --reasoning ./r1 --vlm ./qwen2.5-vl -o swapped --method layer-swap --layers 14-27",
    ),
)
@click.option("--reasoning", required=True, multiple=True, help="Reasoning LLM(s); repeat for several (not layer-swap).")
@click.option("--vlm", required=True, help="The VLM to merge into; its vision tower and projector are kept as they are.")
@click.option("-o", "--output", required=True, help="Output folder: a complete VLM that from_pretrained loads.")
@click.option("--method", required=True, type=click.Choice(METHOD_NAMES), help="Merge method (formulas above).")
@click.option("--weight", type=float, default=None, help="w in the formulas (default 0.5 for every method that uses it).")
@click.option("--density", type=float, default=None, help="Fraction of τ entries kept (default: ties 0.2, dare-* 0.5).")
@click.option("--seed", type=int, default=None, help="DARE's random seed (default 0).")
@click.option("--modules", default="full", show_default=True, help=SELECTION_HELP["modules"])
@click.option("--layers", default=None, help=SELECTION_HELP["layers"] + " Required by layer-swap: the layers replaced.")
@click.option("--skip-first", default=0, show_default=True, type=int, help=SELECTION_HELP["skip_first"])
@click.option("--bias/--no-bias", default=True, help=SELECTION_HELP["bias"])
@click.option("--shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@push_to_hub_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def command(
    reasoning: tuple[str, ...], vlm: str, output: str, method: str, weight: float | None, density: float | None,
    seed: int | None, modules: str, layers: str | None, skip_first: int, bias: bool, shard_size: str, overwrite: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Merge reasoning LLM(s) into a VLM's language model (τ_i = θ_Ri − θ_V).

    \b
      linear           (1−w)·θ_V + w·θ_R               (θ_R: mean of several models)
      task-arithmetic  θ_V + w·Σ τ_i
      ties             θ_V + w·disjoint_mean(trim(τ_i)) trim: top-density |τ| per tensor
      dare-linear      θ_V + w·Σ DARE(τ_i)              DARE: keep with p=density, ×1/density
      dare-ties        θ_V + w·disjoint_mean(DARE(τ_i)) disjoint_mean: TIES sign election
      layer-swap       θ_R in --layers, θ_V elsewhere

    Acts on paired language-model tensors only; vision tower, projector and everything unpaired
    are copied byte for byte, with config, tokenizer and processor files. Defaults for weight,
    density and seed, and the several-model forms, are not specified by the papers (surgeon
    defaults).
    """
    from surgeon.anatomy.families import parse_layers, parse_modules
    from surgeon.merge.engine import MergeConfig, merge_models
    from surgeon.io.output import parse_size

    config = MergeConfig(
        reasoning=tuple(reasoning), vlm=vlm, output=output, method=method, weight=weight, density=density, seed=seed,
        modules=parse_modules(modules), layers=parse_layers(layers), skip_first=skip_first, bias=bias,
        shard_size=parse_size(shard_size), overwrite=overwrite,
    )  # fmt: skip
    with progress() as tick:
        result = merge_models(config, tick)
    push_written(result.output)
    if as_json:
        emit_json(result.to_dict())
        return
    for note in result.notes:
        err.print(f"note: {note}", markup=False)
    params = ", ".join(f"{k}={v}" for k, v in result.params.items() if k != "formula")
    out.print(f"{result.method} merge ({params or 'no parameters'}) written to {result.output} ({human_bytes(result.bytes)})", markup=False)
    table = Table(title="tensors", title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    c = result.counts
    for label, key in (
        (f"merged ({result.selection})", "merged"),
        ("paired but not selected (copied)", "skipped"),
        ("language model without a counterpart (copied)", "unmatched_lm"),
        ("vision tower and projector (copied)", "vision"),
        ("reasoning-model tensors the VLM lacks (unused)", "llm_only"),
    ):
        table.add_row(label, str(c[key]))
    out.print(table)
