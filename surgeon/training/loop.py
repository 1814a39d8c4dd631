"""The training loop of ``surgeon train``: explicit, on Accelerate, exact under any batch split.

    result = train(TrainConfig(model="vlm/", data="data.jsonl", output="run/", max_steps=100))

One optimiser step::

    global batch  = batch_size × grad_accum × world_size samples (surgeon.training.order)
    token counts  = (N_p, N_r) over the whole global batch, all-reduced before any forward
    micro-batches : loss = λ·Σ_p ce/N_p + (1−λ)·Σ_r ce/N_r   (λ = N_p/(N_p+N_r) without reweighting:
                    plain token-averaged cross-entropy), backward; DDP syncs on the last one only
    dynamic λ     : ∇L_p and ∇L_r kept apart over the step, summed over ranks, λ from their norms
    DRIFT         : once, on the accumulated all-reduced gradient   (surgeon.drift.bias)
    clip, AdamW, cosine schedule with warmup

Because every loss is normalised by the global token counts and DRIFT sees the final gradient,
1 process × 2 accumulation steps and 2 processes × 1 step give the same update. Run it with
``surgeon train …`` on one device, or ``accelerate launch -m surgeon.cli train …`` /
``torchrun --nproc-per-node N -m surgeon.cli train …`` on several.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from surgeon.training.config import TrainConfig
from surgeon.training.session import StepCallback, TrainResult


def train(config: TrainConfig, on_step: StepCallback | None = None, on_status: Callable[[str], None] | None = None) -> TrainResult:
    """Run ``config`` to the end and write its output folder; ``on_step`` receives each step's metrics.

    The main process claims the output for the whole run (a second run writing it fails at once).
    Stopped by Ctrl-C or SIGTERM, it raises ``Interrupted`` saying which checkpoint is kept."""
    import contextlib

    from accelerate import PartialState

    from surgeon.errors import ConfigError, Interrupted
    from surgeon.io.output import claim
    from surgeon.training.parallel import default_threads, deepspeed_requested, return_freed_memory
    from surgeon.training.state import checkpoint_root, latest_intact
    from surgeon.training.tracking import check_tracker

    config.require_io()
    check_tracker(config.report_to)
    if deepspeed_requested():
        raise ConfigError("distributed", "surgeon train does not run under DeepSpeed", "shard with --fsdp (FSDP2) instead")
    # cpu=True on machines without CUDA, so that torchrun/accelerate launch gives a gloo process group
    cpu = not torch.cuda.is_available()
    if cpu:
        return_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or default_threads())
    state = PartialState(cpu=cpu)
    try:
        with claim(config.output) if state.is_main_process else contextlib.nullcontext():  # type: ignore[arg-type]
            return _train(config, state, cpu, on_step, on_status)
    except KeyboardInterrupt as exc:
        latest = latest_intact(checkpoint_root(config.output))[0]  # type: ignore[arg-type]
        kept = f"{latest} is kept; run the same command with --resume to continue from it" if latest else "no output was written"
        raise Interrupted(getattr(exc, "signum", 2), kept) from None
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, state: Any, cpu: bool, on_step: StepCallback | None, on_status: Callable[[str], None] | None) -> TrainResult:
    """The loop: a session opened, one optimiser step after another, the session closed."""
    from surgeon.training.session import close_session, open_session, report
    from surgeon.training.steps import accumulate, fetch, step_metrics, update

    status = on_status if (on_status is not None and state.is_main_process) else (lambda text: None)
    s = open_session(config, state, cpu, status, on_step)
    for step in range(s.start, s.total):
        started = time.perf_counter()
        counts = fetch(s)  # the step's micro-batches; span token counts of the global batch
        sums, lam = accumulate(s, counts)  # per micro-batch: forward, span losses, backward
        lam, drift, grad_norm = update(s, lam)  # gradients reduced; DRIFT; clipping; AdamW; the schedule
        report(s, step, step_metrics(s, step, counts, sums, lam, drift, grad_norm, time.perf_counter() - started))
    return close_session(s)
