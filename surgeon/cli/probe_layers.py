"""``surgeon probe-layers --vlm VLM --reasoning LLM --data SET``: where the VLM reads its images and
how its layers take the reasoning model's, layer by layer."""

from __future__ import annotations

import click
from rich.table import Table

from surgeon.cli.group import DtypeName, build, example
from surgeon.cli.console import emit_json, err, out, progress, quiet_transformers


@click.command(
    "probe-layers",
    epilog=example(
        "surgeon demo --workdir demo/",
        "surgeon probe-layers --vlm demo/vlm --reasoning demo/reasoning-llm --data demo/data/data.jsonl -o demo/probe --limit 8 --max-new-tokens 16",
        "surgeon probe-layers --vlm Qwen/Qwen2.5-VL-7B-Instruct --reasoning deepseek-ai/DeepSeek-R1-Distill-Qwen-7B "
        "--data gsm8k.jsonl --image-data charts.parquet -o probe/ --limit 64",
    ),
)
@click.option("--vlm", required=True, help="The VLM (folder or Hub id).")
@click.option("--reasoning", default=None, help="The text reasoning LLM whose layers the swap probe puts into the VLM.")
@click.option("--data", required=True, help="Probe rows (any data `surgeon train` reads): its text-only rows for the swap probe, "
              "its rows with images for mask-vision (unless --image-data).")  # fmt: skip
@click.option("--image-data", default=None, help="Rows with images for the mask-vision probe [default: those of --data].")
@click.option("--probe", "probes", default="swap,mask-vision", show_default=True, help="Which probes: swap, mask-vision.")
@click.option("--weight", type=float, default=1.0, show_default=True, help="Swap: θ_VLM + w·(θ_reasoning − θ_VLM); 1 replaces the layer.")
@click.option("--modules", default="attn,mlp", show_default=True, help="The tensors of a layer the swap replaces (prior's --modules grammar).")
@click.option("--limit", type=int, default=64, show_default=True, help="Rows of each probe set.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-length", type=int, default=2048, show_default=True, help="Tokens per row (longer rows are cut).")
@click.option("--accuracy/--no-accuracy", default=None, help="Also generate and score answers per layer [default: when rows have an `answer` field].")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--tolerance", type=float, default=0.05, show_default=True,
              help="Plateau: layers after which hiding the images moves the image loss by at most this share of the whole effect.")  # fmt: skip
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1… (auto: a GPU if any).")
@click.option("--dtype", type=DtypeName(extra=("auto",)), default="auto", show_default=True, help="auto: float32 on the CPU, the checkpoint's on a GPU.")
@click.option("-o", "--output", default=None, help="Folder for surgeon.json and layers.png.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def command(as_json: bool, **options: object) -> None:
    """Probe each decoder layer of --vlm on a small set: the swap probe puts layer ℓ of --reasoning
    into the VLM (the tensors `prior` pairs) and measures the loss on text rows; the mask-vision
    probe hides image tokens from every text token from layer ℓ on and measures the loss on image
    rows. Where the mask-vision curve has reached the unmasked loss, the layers no longer read the
    images (the plateau, PlaM arXiv 2601.07645): the place to inject reasoning without touching
    perception. Prints a table and a suggested --layers range for prior, merge and train
    (docs/methods.md §7). One layer's tensors are read or changed at a time; the model is
    restored exactly after each pass.
    """
    from surgeon.evaluation.layers import ProbeConfig, probe_layers

    config = build(ProbeConfig, options)
    quiet_transformers()
    with progress() as bar:
        result = probe_layers(config, progress=bar, status=lambda text: err.print(f"surgeon probe-layers: {text}", soft_wrap=True, highlight=False, markup=False))
    if as_json:
        emit_json({**result.to_dict(), "output": result.output})
        return
    _table(result)
    for note in result.notes:
        out.print(f"note: {note}", highlight=False)
    if result.suggested_layers:
        out.print(f"suggested --layers {result.suggested_layers} (for prior, merge and train)", highlight=False)
    if result.output:
        out.print(f"wrote {result.output}")


def _table(result: object) -> None:
    base = result.baseline  # type: ignore[attr-defined]
    columns = [(key, title) for key, title in (("swap_loss", "swap: text loss"), ("swap_accuracy", "swap: accuracy"),
                                               ("mask_loss", "mask-vision: image loss"), ("mask_accuracy", "mask-vision: accuracy"))
               if any(key in row for row in result.layers)]  # type: ignore[attr-defined]  # fmt: skip
    baseline = []
    for key, _ in columns:
        entry = base.get("text" if key.startswith("swap") else "images", {})
        baseline.append(_cell(entry.get(key.split("_", 1)[1]), key))
    table = Table(title=f"per layer (first row: the unchanged model); plateau: {_plateau(result)}", title_justify="left")
    table.add_column("layer", justify="right")
    for _, title in columns:
        table.add_column(title, justify="right")
    table.add_row("—", *baseline)
    for row in result.layers:  # type: ignore[attr-defined]
        table.add_row(str(row["layer"]), *(_cell(row.get(key), key) for key, _ in columns))
    out.print(table)


def _cell(value: object, key: str) -> str:
    if value is None:
        return ""
    return f"{value:.1%}" if key.endswith("accuracy") else f"{value:.4f}"


def _plateau(result: object) -> str:
    plateau = result.plateau  # type: ignore[attr-defined]
    return f"layers {plateau[0]}-{plateau[-1]}" if plateau else "none found"


