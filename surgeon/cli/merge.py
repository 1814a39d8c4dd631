"""``surgeon merge --reasoning X --vlm Y -o OUT --method M``: the merge baselines DRIFT is compared with."""

from __future__ import annotations

import click
from rich.table import Table

from surgeon.cli.group import build, example, selection_options
from surgeon.cli.config_file import config_option
from surgeon.cli.push_option import push_to_hub_option, push_written
from surgeon.cli.console import emit_json, err, human_bytes, out, progress
from surgeon.merge import METHODS, NOTATION

METHOD_NAMES = list(METHODS)


def _help() -> str:
    """The command's help: every registered method's formula, then what all of them share."""
    rows = "\n".join(f"  {name:<16} {m.summary}" for name, m in METHODS.items())
    return (
        "Merge reasoning LLM(s) into a VLM's language model.\n\n\b\n" + rows + "\n\n" + NOTATION + "\n\n"
        "Acts on paired language-model tensors only; vision tower, projector and everything unpaired "
        "are copied byte for byte, with config, tokenizer and processor files. Defaults for weight, "
        "density and seed, and the several-model forms, are not specified by the papers (surgeon "
        "defaults)."
    )


@click.command(
    "merge",
    help=_help(),
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
@click.option("--density", type=float, default=None, help="Fraction of τ entries kept (default: "
              + ", ".join(f"{n} {m.defaults['density']}" for n, m in METHODS.items() if "density" in m.defaults) + ").")
@click.option("--seed", type=int, default=None, help="DARE's random seed (default 0).")
@selection_options(modules="full", layers_note=" Required by layer-swap: the layers replaced.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--requantize", is_flag=True, help="An FP8 VLM (block or per-tensor scales): write its scheme back, merged "
              "weights quantized with new scales, quantization_config kept [default: bf16 values, no quantization_config].")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@push_to_hub_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def command(as_json: bool, **options: object) -> None:
    from surgeon.merge.engine import MergeConfig, merge_models

    config = build(MergeConfig, options)
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
