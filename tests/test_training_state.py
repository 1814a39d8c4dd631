"""Training bookkeeping: world-size-independent sample order and pickle-free checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from surgeon.errors import ConfigError
from surgeon.training.order import SampleOrder
from surgeon.training.state import Progress, latest_intact, load_checkpoint, save_checkpoint


def test_one_process_with_accumulation_sees_the_micro_batches_of_two_processes():
    one = SampleOrder(num_samples=37, batch_size=2, grad_accum=2, world_size=1, seed=3)
    two = SampleOrder(num_samples=37, batch_size=2, grad_accum=1, world_size=2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == 9
    for step in range(20):  # crosses epochs
        assert one.micro_batches(step, 0) == two.micro_batches(step, 0) + two.micro_batches(step, 1)


def test_every_sample_once_per_epoch_and_epochs_reshuffle():
    order = SampleOrder(num_samples=12, batch_size=3, grad_accum=1, world_size=1, seed=0)
    epoch0 = [i for s in range(4) for i in order.global_indices(s)]
    epoch1 = [i for s in range(4, 8) for i in order.global_indices(s)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


def test_too_little_data_for_one_global_batch():
    with pytest.raises(ConfigError, match="fewer than one global batch of 8"):
        SampleOrder(num_samples=5, batch_size=4, grad_accum=2, world_size=1, seed=0)


def _run(steps, params, opt, sched):
    for _ in range(steps):
        loss = sum((p**2).sum() for p in params) + torch.randn(()) * 0  # consumes RNG
        loss = loss + (params[0] * torch.randn(params[0].shape)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_checkpoint_round_trip_continues_exactly(tmp_path):
    def fresh():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
        opt = torch.optim.AdamW(params, lr=0.1, betas=(0.8, 0.95))
        return params, opt, get_cosine_schedule_with_warmup(opt, 2, 10)

    params, opt, sched = fresh()
    _run(3, params, opt, sched)
    save_checkpoint(tmp_path / "checkpoint-3", Progress(3, "abc"), {"a": params[0], "b": params[1]}, opt, sched)
    _run(4, params, opt, sched)
    expected = [p.detach().clone() for p in params]

    params2, opt2, sched2 = fresh()
    assert latest_intact(tmp_path) == (tmp_path / "checkpoint-3", [])
    step = load_checkpoint(tmp_path / "checkpoint-3", Progress(0, "abc"), {"a": params2[0], "b": params2[1]}, opt2, sched2)
    assert step == 3
    _run(4, params2, opt2, sched2)
    for a, b in zip(expected, params2):
        assert torch.equal(a, b.detach())
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.bin"))


def test_resume_refuses_other_settings(tmp_path):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p])
    sched = get_cosine_schedule_with_warmup(opt, 0, 4)
    save_checkpoint(tmp_path / "checkpoint-1", Progress(1, "one"), {"p": p}, opt, sched)
    with pytest.raises(ConfigError, match="different training settings"):
        load_checkpoint(tmp_path / "checkpoint-1", Progress(0, "two"), {"p": p}, opt, sched)
