"""``surgeon train``: fine-tune a VLM with LoRA or fully, with DRIFT, IADA and reweighting."""

from __future__ import annotations

import click
from surgeon.cli.group import SELECTION_HELP, DtypeName, build, example
from surgeon.cli.console import emit_json, err, out, quiet_transformers
from surgeon.cli.config_file import config_option
from surgeon.cli.push_option import push_to_hub_option, push_written


@click.command(
    "train",
    epilog=example(
        "surgeon demo --workdir demo/",
        "surgeon train demo/vlm --data demo/data/data.jsonl -o run/ --max-steps 20 --perception-weight 0.5",
        "surgeon train demo/vlm --data demo/data/data.jsonl -o run-drift/ --full --prior demo/prior --max-steps 20",
        "surgeon train demo/vlm --data demo/data/data.jsonl -o run-lora-drift/ --prior demo/prior --modules attn_proj --max-steps 20",
        "surgeon train demo/vlm --data demo/data/data.jsonl -o run-il/ --image-lora demo/heads --max-steps 20 --lr 1e-3",
        "surgeon train demo/vlm --full --prior demo/prior --dry-run --fsdp --num-processes 8 --gpu-memory 80GB",
    ),
)
@click.argument("model")
@click.option(
    "--data", default=None,
    help="JSONL/JSON, parquet, a save_to_disk folder or a Hub dataset id (org/name[:split]): TRL `messages` or "
    "ShareGPT/LLaMA-Factory rows; images as paths (relative to the file) or as image bytes.",
)
@click.option("-o", "--output", default=None, help="Output folder (checkpoints go to OUTPUT-checkpoints/).")
@click.option("--max-steps", type=int, default=None, help="Optimiser steps (default: --epochs over the data).")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 1e-4 LoRA, 1e-5 --full].")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Samples per micro-batch and process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimiser step.")
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--max-skipped-share", type=float, default=0.5, show_default=True,
              help="Stop when more than this share of the samples so far were skipped (too long for --max-length, or bad with --skip-bad-lines).")  # fmt: skip
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Clip the gradient norm (0: off).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--full", is_flag=True, help="Full fine-tuning of the language model instead of LoRA.")
@click.option("--lora-rank", type=int, default=16, show_default=True)
@click.option("--lora-alpha", type=float, default=32.0, show_default=True)
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option(
    "--modules", default=None,
    help="Language-model tensors to train (--full), wrap with LoRA, and bias with DRIFT, in prior/merge's grammar: "
    "attn, mlp, attn_proj, gate_up, norm, final_norm, embed, head, full, re:REGEX on LM-relative names [default: "
    "LoRA attn,mlp; --full everything].",
)  # fmt: skip
@click.option("--layers", default=None, help=SELECTION_HELP["layers"] + " Use 'surgeon probe-layers' to find a range.")
@click.option("--lora-targets", default="attn,mlp", hidden=True, help="Older name of --modules for LoRA.")
@click.option("--train-vision", is_flag=True, help="Also train the vision tower and projector.")
@click.option("--max-length", type=int, default=2048, show_default=True, help="Tokens per sample: longer ones are truncated; a sample whose image would be cut is skipped and counted.")
@click.option(
    "--packing", is_flag=True,
    help="Lay each micro-batch's samples end to end in one row with no padding; each sample attends only to itself and "
    "its positions restart (Qwen-VL: its own 3-D M-RoPE positions).",
)
@click.option(
    "--max-tokens-per-batch", type=int, default=None, metavar="N",
    help="Fill each micro-batch with samples up to N tokens (summed when packed, longest × count when padded) instead of "
    "--batch-size samples; the samples' lengths are measured once before training.",
)
@click.option(
    "--group-by-length", is_flag=True,
    help="Without packing: put samples of similar length in the same micro-batch (sorted within windows of 50 global batches).",
)
@click.option(
    "--chunked-loss/--no-chunked-loss", default=True, show_default=True,
    help="Compute the loss from the LM head's input in chunks, never holding the [tokens × vocabulary] logits.",
)
@click.option(
    "--attn", type=click.Choice(["sdpa", "eager", "flash_attention_2", "flex_attention"]), default="sdpa", show_default=True,
    help="The language model's attention (flash_attention_2 needs flash-attn on a GPU; flex_attention trains on GPUs only).",
)
@click.option(
    "--mixed-precision", type=DtypeName(("bf16", "fp16"), ("auto", "no")), default="auto", show_default=True,
    help="Compute dtype: auto is bf16 on a GPU that has it, else no (fp32). Frozen weights are kept in it.",
)
@click.option(
    "--param-dtype", type=DtypeName(("fp32", "bf16")), default="fp32", show_default=True,
    help="Trained parameters (master copies), their gradients and AdamW state: fp32 costs 16 bytes per trained "
    "parameter, bf16 8 (less exact updates).",
)
@click.option(
    "--fsdp", is_flag=True,
    help="Shard parameters, gradients, optimizer state and DRIFT's Δ over the processes (FSDP2, one unit per decoder "
    "layer); needs a launch on several processes (torchrun / accelerate launch).",
)
@click.option("--gpu-memory", default=None, metavar="SIZE", help="Memory per process to plan against, e.g. 80GB [default: the device's].")
@click.option("--dry-run", is_flag=True, help="Print the memory plan per process from config.json alone and exit: for a GPU when there is one or --gpu-memory is given, else for the CPU.")
@click.option("--num-processes", type=int, default=None, help="Processes the --dry-run plan is for [default: 1].")
@click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for activation memory.")
@click.option("--save-steps", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: never).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CHECKPOINT]",
              help="Continue exactly from the latest checkpoint in OUTPUT-checkpoints/, or from the checkpoint-N folder given, or from a Hub repo ORG/NAME[@REVISION] holding one.")
@click.option("--save-total-limit", type=int, default=None, help="Keep only this many newest checkpoints (default: all).")
@click.option(
    "--resume-anyway", is_flag=True,
    help="With --resume: continue although the base model's (or prior's) weights changed since the checkpoint (a warning says so).",
)
@click.option("--merge-lora", is_flag=True, help="Write a standard merged model folder instead of a peft adapter.")
@click.option("--prior", default=None, help="DRIFT: a prior folder from `surgeon prior`; with LoRA, DRIFT acts through the adapters.")
@click.option("--drift-alpha", type=float, default=1.0, show_default=True, help="DRIFT strength α.")
@click.option(
    "--drift-scale", type=click.Choice(["adaptive_cosine", "gradnorm", "absolute"]), default="adaptive_cosine", show_default=True
)
@click.option(
    "--drift-normalize/--no-drift-normalize", default=True, show_default=True, help="Scale Δ to ‖θ_VLM‖ (affects absolute only)."
)
@click.option(
    "--perception-weight", default=None, help="λ in [0,1] for L = λ·L_perception + (1−λ)·L_reasoning, or 'dynamic'."
)
@click.option("--perception-regex", default=None, help="Regex for perception spans instead of <perception> tags.")
@click.option(
    "--iada", is_flag=True,
    help="Inject IADA blocks with the defaults of `surgeon inject-iada` first, and train them (a model with blocks trains them anyway).",
)
@click.option(
    "--image-lora", default=None, metavar="HEADS_JSON",
    help="Train Image-LoRA on the heads selected by `surgeon score-heads` (language model frozen, no LoRA on it).",
)
@click.option("--image-lora-rank", type=int, default=8, show_default=True, help="Image-LoRA rank r.")
@click.option("--image-lora-alpha", type=float, default=16.0, show_default=True, help="Image-LoRA α (scale α/r).")
@click.option("--skip-bad-lines", is_flag=True, help="Skip and count malformed samples instead of stopping.")
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader processes that read and encode samples (0: the training process).")
@click.option("--threads", type=int, default=None,
              help="CPU threads per process for torch's intra-op work. Default: OMP_NUM_THREADS when set (torchrun sets 1 "
                   "for several processes), else this process's cores divided by the processes on this node.")
@click.option("--eval-set", multiple=True, metavar="NAME=DATA",
              help="Score this set by greedy generation during training (as surgeon eval does); repeatable. Needs --eval-every.")
@click.option("--eval-every", type=int, default=None, metavar="N",
              help="Evaluate every N steps and after the last: each --eval-set's accuracy and KL(base ‖ current) on fixed text-only prompts.")
@click.option("--eval-limit", type=int, default=200, show_default=True, help="Items of each --eval-set.")
@click.option("--eval-max-new-tokens", type=int, default=128, show_default=True)
@click.option("--log-steps", type=int, default=10, show_default=True, help="When stderr is not a terminal: a progress line every N steps.")
@click.option(
    "--report-to", type=click.Choice(["none", "tensorboard", "wandb"]), default="none", show_default=True,
    help="Also log every step's metrics to TensorBoard (event files in OUTPUT/logs) or W&B.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and its checkpoints).")
@push_to_hub_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def command(as_json: bool, dry_run: bool, num_processes: int | None, **options: object) -> None:
    """Fine-tune MODEL on --data with LoRA (default) or --full, optionally with DRIFT (--prior),
    perception/reasoning reweighting (--perception-weight) and the model's IADA blocks.

    \b
    --image-lora HEADS_JSON trains Image-LoRA instead of LoRA: value-projection adapters at
    image/video tokens of the selected KV heads only, with the language model frozen (the
    paper's setting; default lr 1e-5 as in its reference code). IADA blocks of the model (or
    --iada) train beside it. The output is then MODEL's files (weights hard-linked) plus the
    adapters in surgeon-image_lora.safetensors and remote code: it loads with
    surgeon.load_model(OUT) or from_pretrained(OUT, trust_remote_code=True). --full, --prior and
    --merge-lora do not combine with it.

    \b
    Runs on one CPU or GPU as is, and on several with
      torchrun --nproc-per-node N -m surgeon.cli train …
      accelerate launch --multi_gpu --num_processes N -m surgeon.cli train …
    (without --multi_gpu or --use_fsdp, accelerate launch starts a single process). The update does
    not depend on how the global batch (batch size × accumulation × processes) is split.
    --fsdp (or accelerate launch --use_fsdp) shards parameters, gradients, AdamW state and DRIFT's
    Δ over the processes with FSDP2, one unit per decoder layer; the vision tower stays
    replicated. DeepSpeed is not supported. Output: a peft adapter folder (or full weights, or
    --merge-lora), metrics.jsonl and surgeon.json.

    \b
    Precision: with mixed precision (auto: bf16 on a GPU that has it) frozen weights are bf16 and
    trained parameters, gradients and AdamW state fp32, 16 bytes per trained parameter (about
    122 GB for a 7.6B language model on one process); --param-dtype bf16 halves that. --dry-run
    prints this plan per process from config.json alone; a run whose plan exceeds its device's
    memory (or --gpu-memory) stops before loading.
    """
    from surgeon.training.config import TrainConfig
    from surgeon.training.loop import train

    config = build(TrainConfig, options)
    quiet_transformers()
    if dry_run:
        _print_plan(config, num_processes or 1, as_json)
        return
    if num_processes is not None:
        from surgeon.errors import ConfigError

        raise ConfigError("num_processes", "only sizes a --dry-run plan", "launch the processes with torchrun --nproc-per-node N")
    _close_process_group_at_exit()
    with _StepBar(config.log_steps) as bar:
        result = train(config, on_step=bar.update, on_status=lambda text: err.print(f"surgeon train: {text}", soft_wrap=True, highlight=False, markup=False))
    if not result.main_process:
        return
    push_written(result.output)
    if as_json:
        emit_json({"output": result.output, "steps": result.steps, "metrics": result.metrics, "stats": result.stats})
        return
    m = result.metrics
    out.print(f"trained {result.steps} step{'s' if result.steps != 1 else ''}: loss {m.get('loss', float('nan')):.4f}; wrote {result.output}")


def _close_process_group_at_exit() -> None:
    """A launched run leaves its process group to be closed at exit, after every rank is done."""
    import atexit

    atexit.unregister(_close_process_group)
    atexit.register(_close_process_group)


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _print_plan(config: object, processes: int, as_json: bool) -> None:
    from surgeon.training.plan import plan_for

    plan = plan_for(config, processes)  # type: ignore[arg-type]
    if as_json:
        emit_json(plan.to_dict())
        return
    how = f"{plan.processes} process{'es' if plan.processes != 1 else ''}, " + ("sharded (FSDP)" if plan.sharded else "unsharded")
    prec = plan.precision
    where = "the CPU" if plan.device == "cpu" else "a GPU"
    out.print(f"memory plan for {where}: {plan.architecture}, {how}, {prec['compute']} compute, trained parameters in {prec['trained']}")
    p = plan.parameters
    out.print(f"parameters: {p['total']:,} ({p['trained']:,} trained, {p['frozen']:,} frozen; {p['replicated']:,} replicated on every process)")
    for part, value in plan.parts.items():
        out.print(f"  {part:<12} {value / 1e9:9.2f} GB")
    verdict = "" if plan.budget is None else (" fits " if plan.fits else " does NOT fit ") + f"{plan.budget / 1e9:.1f} GB {plan.budget_source}"
    out.print(f"  {'total':<12} {plan.per_process_bytes / 1e9:9.2f} GB per process;{verdict}")
    ckpt = "gradient checkpointing" if plan.gradient_checkpointing else "no gradient checkpointing"
    out.print(f"activations for {plan.tokens:,} tokens per micro-batch (--batch-size × --max-length), {ckpt}")
    for note in plan.notes:
        out.print(note)
    out.print("dry run: nothing loaded or written")


class _StepBar:
    """Progress on stderr: a rich bar (loss, learning rate, tokens/s) on a terminal; otherwise a
    plain line every ``every`` steps and at the last one, for logs of long runs."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.started: float | None = None
        self.first = 0

    def __enter__(self) -> _StepBar:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=err, transient=False, disable=not err.is_terminal,
        )  # fmt: skip
        self.task = None
        self.progress.__enter__()
        return self

    def update(self, metrics: dict) -> None:
        import time

        step, total = metrics["step"], metrics.get("total_steps")
        now = time.monotonic()
        if self.started is None:  # the first step seen (a resumed run starts later): ETA from here
            self.started, self.first = now - (metrics["tokens"] / metrics["tokens_per_s"] if metrics.get("tokens_per_s") else 0.0), step - 1
        if not err.is_terminal:
            if step % self.every == 0 or step == total:
                err.print(_line(metrics, now - self.started, step - self.first), soft_wrap=True, highlight=False, markup=False)
            return
        info = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}"
        if metrics.get("tokens_per_s"):
            info += f"  {metrics['tokens_per_s']:.0f} tok/s"
        if self.task is None:
            self.task = self.progress.add_task("train", total=total, info=info)
        self.progress.update(self.task, completed=step, total=total, info=info)

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


def _share(m: dict) -> str:
    """The padding's share of the positions a step computed."""
    computed = m.get("tokens", 0) + m.get("padding", 0)
    return f"{100 * m.get('padding', 0) / computed:.0f}%" if computed else "-"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _line(m: dict, elapsed: float, done: int) -> str:
    """``step 3/6  loss 6.2719  L_p 6.3012  L_r 6.2503  λ 0.310  lr 1.00e-03  grad 2.16  1234 tok/s  pad 12%  elapsed 0:00:05  ETA 0:00:05``."""
    total = m.get("total_steps") or m["step"]
    eta = elapsed / max(done, 1) * (total - m["step"])
    grad = f"{m['grad_norm']:.3g}" if m.get("grad_norm") is not None else "-"
    rate = f"{m['tokens_per_s']:.0f}" if m.get("tokens_per_s") else "-"
    return (
        f"step {m['step']}/{total}  loss {m['loss']:.4f}  L_p {m['loss_perception']:.4f}  L_r {m['loss_reasoning']:.4f}"
        f"  λ {m['lambda']:.3f}  lr {m['lr']:.2e}  grad {grad}  {rate} tok/s  pad {_share(m)}  elapsed {_clock(elapsed)}  ETA {_clock(eta)}"
    )
