"""The study's preparation (organisms, data sets, priors, the layer probe, the format-trained VLM)
and its report (tables with the paired tests of `surgeon eval`, and the figures). run.py drives it."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Surgeon = Callable[[list[str], str], None]  # (surgeon arguments, log file name)


# ------------------------------------------------------------------ preparation


def organism_and_data(folder: Path, size: str, budget: Any, device: str, log: Any, old: tuple[str, ...], new: tuple[str, ...]) -> dict[str, str]:
    """The three models of ``organism.build`` and every data set the conditions read, built once."""
    import organism

    marker = folder / "organism" / "done.json"
    data = folder / "organism" / "data"
    if not marker.exists():
        log(f"building the {size} organism")
        t0 = time.time()
        paths = organism.build(folder / "organism", organism.SIZES[size], device, log)
        visual = organism.visual_problem

        def problems(colours: tuple[str, ...]) -> Any:
            return lambda r, p: visual(r, p, r.randint(1, 2), colours)

        everything = tuple(organism.COLOURS)
        organism.write_visual_set(data, "sft", budget.sft_samples, 10, problems(everything))
        organism.write_visual_set(data, "eval-visual", budget.eval_samples, 11, problems(everything))
        half = budget.eval_samples // 2
        organism.write_jsonl(data / "eval-text.jsonl", organism.text_set(half, 12, {2: 1}) + organism.text_set(half, 13, {3: 1}))
        organism.write_jsonl(data / "probe-text.jsonl", organism.text_set(budget.probe_rows, 14, {2: 1, 3: 1}))
        organism.write_visual_set(data, "probe-visual", budget.probe_rows, 15, problems(everything))
        organism.write_visual_set(data, "format", budget.format_steps * budget.batch, 16, problems(old))
        organism.write_visual_set(data, "sft-new", budget.sft_samples, 17, problems(new))
        organism.write_visual_set(data, "eval-visual-new", budget.eval_samples, 18, problems(new))
        marker.write_text(json.dumps({k: str(v) for k, v in paths.items()} | {"seconds": round(time.time() - t0)}))
    paths = json.loads(marker.read_text())
    layers = organism.SIZES[size].layers
    return {
        "vlm": paths["vlm"], "reasoning": paths["reasoning"], "base": paths["base"], "data": str(data),
        "sft": str(data / "sft.jsonl"), "sft_new": str(data / "sft-new.jsonl"), "format": str(data / "format.jsonl"),
        "prior": str(folder / "prior"), "prior_layers": str(folder / "prior-layers"), "layers_total": str(layers),
        "block": "1" if layers <= 4 else str(layers // 4),  # four boundaries, as S 7 gives on a 28-layer model
    }  # fmt: skip


def priors_and_probe(folder: Path, places: dict[str, str], budget: Any, surgeon: Surgeon, log: Any) -> dict[str, str]:
    """``surgeon prior``; ``surgeon probe-layers`` and the prior over the layers it suggests."""
    data = Path(places["data"])
    pair = ["--reasoning", places["reasoning"], "--vlm", places["vlm"]]
    surgeon(["prior", *pair, "-o", places["prior"], "--overwrite"], "prior.log")
    probe = folder / "probe"
    surgeon(["probe-layers", *pair, "--data", str(data / "probe-text.jsonl"), "--image-data", str(data / "probe-visual.jsonl"),
             "-o", str(probe), "--limit", str(budget.probe_rows), "--no-accuracy", "--overwrite"], "probe.log")  # fmt: skip
    stats = json.loads((probe / "surgeon.json").read_text())["stats"]
    layers, source = stats.get("suggested_layers"), "probe-layers"
    if not layers:  # no plateau and no swap curve: the upper half, as the DRIFT paper's layer ablations favour
        total = int(places["layers_total"])
        layers, source = f"{total // 2}-{total - 1}", "fallback (probe-layers suggested none)"
        log(f"  probe-layers suggested no range; DRIFT on probed layers uses {layers}")
    surgeon(["prior", *pair, "-o", places["prior_layers"], "--layers", layers, "--overwrite"], "prior-layers.log")
    return {"layers": layers, "layers_source": source, "probe": str(probe)}


def format_trained_vlm(folder: Path, places: dict[str, str], budget: Any, surgeon: Surgeon) -> str:
    """The VLM fine-tuned (full, language model) on the visual task's format with the old colours:
    the starting point of the new-content setting, where Image-LoRA's question is only the new content."""
    out = folder / "vlm-format"
    if not (out / "surgeon.json").exists():
        surgeon(["train", places["vlm"], "--data", places["format"], "-o", str(out), "--full", "--max-steps", str(budget.format_steps),
                 "--batch-size", str(budget.batch), "--lr", str(budget.full_lr), "--seed", "0", "--overwrite"], "format.log")  # fmt: skip
    return str(out)


def versions() -> dict[str, str]:
    from importlib import metadata

    return {p: metadata.version(p) for p in ("torch", "transformers", "peft")}


# ------------------------------------------------------------------ statistics

METRICS = ("text", "perception", "end_to_end")


def _pooled(runs: list[Any], metric: str) -> list[bool]:
    return [c == "1" for r in sorted(runs, key=lambda r: r.seed) for c in r.correct.get(metric, "")]


def _paired(mine: list[Any], ref: list[Any], metric: str) -> tuple[list[bool], list[bool]]:
    """Item-aligned vectors over the seeds: each run of ``mine`` against the reference run of the same
    seed (or the reference's one run, when it does not depend on the seed)."""
    by_seed = {r.seed: r for r in ref}
    first, second = [], []
    for run in sorted(mine, key=lambda r: r.seed):
        other = by_seed.get(run.seed) or (ref[0] if len(ref) == 1 else None)
        if other is None or metric not in run.correct or metric not in other.correct:
            continue
        first += [c == "1" for c in other.correct[metric]]
        second += [c == "1" for c in run.correct[metric]]
    return first, second


def summarise(runs: list[Any], conditions: list[Any], sizes: list[str]) -> list[dict]:
    """One row per size and condition: mean ± sd over seeds, the pooled Wilson 95 % interval, and the
    paired comparison with the reference row (``surgeon.evaluation.stats.compare``)."""
    from surgeon.evaluation.stats import compare, wilson

    rows = []
    for size in sizes:
        here = [r for r in runs if r.size == size]
        for cond in conditions:
            mine = [r for r in here if r.condition == cond.name]
            if not mine:
                continue
            row: dict[str, Any] = {"size": size, "condition": cond.name, "what": cond.what, "runs": len(mine), "reference": cond.reference}
            ref = [r for r in here if r.condition == cond.reference]
            for metric in METRICS:
                values = [getattr(r, metric) for r in mine if getattr(r, metric) is not None]
                if not values:
                    continue
                pooled = _pooled(mine, metric)
                row[metric] = {
                    "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n_items": len(pooled), "wilson_95": list(wilson(sum(pooled), len(pooled))),
                }  # fmt: skip
                first, second = _paired(mine, ref, metric) if ref else ([], [])
                if first:
                    row[metric]["vs_reference"] = compare(first, second)
            rows.append(row)
    return rows


def _cell(row: dict, metric: str) -> str:
    if metric not in row:
        return "–"
    m = row[metric]
    text = f"{100 * m['mean']:.1f} ± {100 * m['sd']:.1f}"
    if "vs_reference" in m:
        c = m["vs_reference"]
        p = c["p_value"]
        text += f" ({100 * c['difference']:+.1f}, p {'<0.001' if p < 0.001 else f'{p:.3f}'}){'**' if p < 0.05 else ''}"
    return text


def tables(rows: list[dict], sizes: list[str]) -> str:
    """Markdown: per size, mean ± sd over seeds in %, then (the difference from the reference row,
    McNemar's exact p on the paired items of every seed); ** marks p < 0.05."""
    out = []
    for size in sizes:
        out += [f"### {size}", "", "| condition | runs | compared with | text reasoning % | perception % | end to end % |", "|---|---:|---|---:|---:|---:|"]
        for row in (r for r in rows if r["size"] == size):
            cells = " | ".join(_cell(row, m) for m in METRICS)
            out.append(f"| {row['condition']} | {row['runs']} | {row['reference'] or '–'} | {cells} |")
        out.append("")
    return "\n".join(out)


def report(work: Path, runs: list[Any], conditions: list[Any], sizes: list[str]) -> str:
    """results.md, the summary rows in results-summary.json and the figures; returns the tables."""
    rows = summarise(runs, conditions, sizes)
    text = tables(rows, sizes)
    (work / "results.md").write_text(text + "\n")
    (work / "results-summary.json").write_text(json.dumps(rows, indent=1))
    figures(work / "figures", rows, sizes)
    return text


# ------------------------------------------------------------------ figures

TAX = ("base LM", "reasoning LLM", "VLM, no SFT", "SFT LoRA", "SFT full")


def figures(folder: Path, rows: list[dict], sizes: list[str]) -> list[Path]:
    """tax.png (the tax at each size), tradeoff.png (each method's text reasoning against perception)
    and depth.png (each method's change against its reference at each size). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    made = [_tax(plt, folder / "tax.png", rows, sizes), _tradeoff(plt, folder / "tradeoff.png", rows, sizes)]
    made.append(_depth(plt, folder / "depth.png", rows, sizes))
    return [p for p in made if p is not None]


def _tax(plt: Any, path: Path, rows: list[dict], sizes: list[str]) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(len(sizes), 1)
    for i, size in enumerate(sizes):
        by = {r["condition"]: r for r in rows if r["size"] == size and "text" in r}
        names = [n for n in TAX if n in by]
        means = [100 * by[n]["text"]["mean"] for n in names]
        low = [m - 100 * by[n]["text"]["wilson_95"][0] for m, n in zip(means, names)]
        high = [100 * by[n]["text"]["wilson_95"][1] - m for m, n in zip(means, names)]
        xs = [TAX.index(n) + (i - (len(sizes) - 1) / 2) * width for n in names]
        ax.bar(xs, means, width, yerr=[low, high], capsize=3, label=size)
    ax.set_xticks(range(len(TAX)), TAX, fontsize=8)
    ax.set_ylabel("text reasoning accuracy, %")
    ax.set_title("The reasoning tax at each size (95 % Wilson intervals over the pooled seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _tradeoff(plt: Any, path: Path, rows: list[dict], sizes: list[str]) -> Path | None:
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 5.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for r in (r for r in rows if r["size"] == size and "perception" in r and not r["condition"].startswith("new colours")):
            x, y = 100 * r["perception"]["mean"], 100 * r["text"]["mean"]
            ax.errorbar(x, y, xerr=100 * r["perception"]["sd"], yerr=100 * r["text"]["sd"], fmt="o", ms=4, capsize=2)
            ax.annotate(r["condition"].replace("SFT full", "full").replace("SFT LoRA", "LoRA"), (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("perception accuracy, %")
        ax.set_ylabel("text reasoning accuracy, %")
        ax.set_title(f"{size}: each method's trade-off (mean ± sd over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _depth(plt: Any, path: Path, rows: list[dict], sizes: list[str]) -> Path | None:
    names = list(dict.fromkeys(r["condition"] for r in rows if "vs_reference" in r.get("text", {})))
    if not names:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.32 * len(names) + 1.5), sharey=True)
    for ax, metric in zip(axes, ("text", "perception")):
        for i, size in enumerate(sizes):
            by = {r["condition"]: r for r in rows if r["size"] == size}
            ys, xs, lo, hi = [], [], [], []
            for j, name in enumerate(names):
                c = by.get(name, {}).get(metric, {}).get("vs_reference")
                if c is None:
                    continue
                ys.append(j + (i - (len(sizes) - 1) / 2) * 0.3)
                xs.append(100 * c["difference"])
                lo.append(100 * (c["difference"] - c["bootstrap_95"][0]))
                hi.append(100 * (c["bootstrap_95"][1] - c["difference"]))
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=2, label=size)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"{'text reasoning' if metric == 'text' else 'perception'}: change from the reference row, points")
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8)
    fig.suptitle("Each method against its reference, at each size (paired bootstrap 95 % intervals)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
