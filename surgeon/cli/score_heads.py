"""``surgeon score-heads MODEL --data DATA.jsonl -o heads.json``: which KV heads Image-LoRA should adapt."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from surgeon.cli.group import DtypeName, build, example
from surgeon.cli.push_option import push_to_hub_option, push_written, pushing
from surgeon.cli.console import emit_json, human_count, out, progress, quiet_transformers
from surgeon.heads.score import HeadScores


@click.command(
    "score-heads",
    epilog=example(
        "surgeon demo --workdir demo/",
        "surgeon score-heads demo/vlm --data demo/data/data.jsonl -o heads.json --steps 4",
        "surgeon train demo/vlm --data demo/data/data.jsonl -o run-heads/ --image-lora heads.json --max-steps 20 --lr 1e-3",
    ),
)
@click.argument("model")
@click.option("--data", required=True, help="JSONL chat data (as for `surgeon train`); samples with images are probed.")
@click.option("-o", "--output", required=True,
              help="heads.json to write, or a folder (heads.json + surgeon.json, for `surgeon push`).")
@click.option("--probe", type=click.Choice(["gate", "rank1"]), default="gate", show_default=True,
              help="gate: per-head gates on visual-token values (as released by the authors); "
                   "rank1: a rank-1 visual-token LoRA on every head (the paper's description).")
@click.option("--steps", default=32, show_default=True,
              help="Probe batches (not specified by the paper; surgeon default).")
@click.option("--batch-size", default=1, show_default=True, help="Samples per probe batch.")
@click.option("--budget", type=int, default=None,
              help="K, heads selected in all [default: a quarter of all KV heads, the reference's].")
@click.option("--tau", default=0.5, show_default=True,
              help="τ of the allocation k_l ∝ M_l^τ: 0 spreads evenly over layers, 1 follows the score mass.")
@click.option("--per-layer", type=int, default=None, help="A fixed number of heads in every layer instead of --budget.")
@click.option("--max-length", default=2048, show_default=True, help="Tokens per sample; longer samples are skipped.")
@click.option("--seed", default=0, show_default=True, help="Order of the probe samples and the rank1 probe's A.")
@click.option("--device", default="auto", show_default=True, help="auto (first GPU, else CPU), cpu, cuda, cuda:N.")
@click.option("--dtype", type=DtypeName(extra=("auto",)), default="auto", show_default=True,
              help="auto: float32 on CPU, the checkpoint's dtype on GPU.")
@click.option("--skip-bad-lines", is_flag=True, help="Skip and count malformed samples instead of stopping.")
@click.option("--plot", default=None, help="Also draw the scores into this picture (PNG, SVG, PDF; needs matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and plot).")
@push_to_hub_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def command(as_json: bool, **options: object) -> None:
    """Score every KV head of MODEL for Image-LoRA and select the heads to adapt.

    \b
    The model stays frozen. A probe acts on value vectors at image/video tokens only, and each
    head's score sums the probe's squared gradient of the answer-token cross-entropy over the
    probe batches (docs/methods.md §4). Selection: layer mass M_l = Σ_h max(score, 0), then
    k_l = round(K·M_l^τ/Σ M^τ) capped at the KV heads per layer, rounded to sum to K (adding to
    the highest-mass layers first, removing from the lowest first), and the top-k_l heads of each
    layer. The probe samples are the data's samples with images in a seeded random order, and
    rounding is half up (surgeon defaults; not specified by the paper). The answer tokens are the
    assistant text and its end-of-turn token, as in training; the authors' scripts also supervise
    the newline after <|im_end|>, so scores differ slightly from theirs.

    \b
    Shows a layers × heads heatmap and the adapter's cost: its FLOPs against LoRA on the value
    projection over all tokens, next to the measured visual-token fraction of the probe batches.
    Train the selected heads with `surgeon train MODEL … --image-lora heads.json`.
    """
    from surgeon.heads.score import ScoreHeadsConfig, score_heads

    config = build(ScoreHeadsConfig, options)
    if pushing() and str(config.output).lower().endswith(".json"):
        raise click.UsageError("--push-to-hub needs a folder output (-o heads/), not a .json file")
    quiet_transformers()
    with progress() as bar:
        result = score_heads(config, progress=bar)
    if result.output:
        push_written(result.output)
    if as_json:
        emit_json({**result.to_dict(), "output": result.output, "plot": config.plot})
        return
    out.print(heatmap(result))
    _summary(result, config.plot)


def heatmap(result: HeadScores) -> Table:
    """Layers × KV heads; colour grows with the score (relative to the largest), ● marks a selected head."""
    top = max((max(row) for row in result.scores), default=0.0) or 1.0
    table = Table(title=f"{result.probe} head scores (● selected)", title_justify="left")
    table.add_column("layer", justify="right")
    for h in range(result.num_kv_heads):
        table.add_column(f"h{h}", justify="right")
    table.add_column("k", justify="right")
    for layer, row in enumerate(result.scores):
        cells = []
        for h, value in enumerate(row):
            level = max(0.0, min(1.0, value / top))
            shade = int(40 + 200 * level)
            chosen = h in result.selected[layer]
            style = f"{'bold ' if chosen else ''}{'black' if level > 0.6 else 'white'} on rgb({shade},{int(shade * 0.6)},40)"
            cells.append(Text(f"{value:.2e} {'●' if chosen else ' '}", style=style))
        table.add_row(str(layer), *cells, str(len(result.selected[layer])))
    return table


def _summary(r: HeadScores, plot: str | None) -> None:
    from surgeon.modules.image_lora import count_parameters

    f = r.flops
    how = f"per layer {r.per_layer}" if r.per_layer is not None else f"budget K={r.budget}, τ={r.tau:g}"
    out.print(
        f"probe {r.probe}: {r.batches} batch(es), {r.samples} sample(s), {r.tokens:,} tokens of which "
        f"{r.visual_tokens:,} visual ({f['visual_fraction']:.1%})"
    )
    per_layer = " ".join(map(str, r.layer_budgets))
    out.print(f"selected {sum(map(len, r.selected))} of {r.num_layers * r.num_kv_heads} KV heads ({how}); per layer: {per_layer}")
    params = count_parameters(r.selected, r.hidden_size, r.head_dim, f["rank"])
    out.print(
        f"Image-LoRA at r={f['rank']}: {params:,} ({human_count(params)}) parameters; adapter FLOPs "
        f"{f['ratio']:.2%} of LoRA on v_proj over all tokens (visual-token fraction {f['visual_fraction']:.2%})"
    )
    out.print(f"wrote {r.output}" + (f" and {plot}" if plot else ""))
