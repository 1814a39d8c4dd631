"""Sharded tensors (``surgeon.dtensor``) and DRIFT on them, on 2 CPU processes (gloo): the
sharded update, the clipping norm and Δ's memory, against the unsharded formula."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys

from helpers import free_port

SCRIPT = r'''
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from surgeon.drift.bias import Drift, clip_grad_norm
from surgeon.dtensor import global_norm, local, row_range

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (2,))
gen = torch.Generator().manual_seed(0)
shapes = [(7, 5), (1, 3), (6,), (4, 4)]      # odd rows, fewer rows than ranks, a bias, one not biased
params = [torch.randn(s, generator=gen) for s in shapes]
grads = [torch.randn(s, generator=gen) for s in shapes]
deltas = [torch.randn(s, generator=gen) for s in shapes[:3]]
norm_to = [2.0, None, 0.5]
for scale in ("adaptive_cosine", "gradnorm", "absolute"):
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(ref, grads):
        p.grad = g.clone()
    d = Drift([(f"t{i}", ref[i], deltas[i], norm_to[i]) for i in range(3)], alpha=0.7, scale=scale)
    stats = d.apply(norms_of=ref)
    expected_total = torch.nn.utils.get_total_norm([p.grad for p in ref])
    clip_grad_norm(ref, 1.0, stats.total_norm)

    sh = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in params]
    for p, g in zip(sh, grads):
        p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
    ds = Drift([(f"t{i}", sh[i], deltas[i], norm_to[i]) for i in range(3)], alpha=0.7, scale=scale)
    # each rank holds only its rows of Δ
    assert ds.local_bytes == sum(local(p).shape[0] * (p.numel() // p.shape[0]) * 4 for p in sh[:3]), ds.local_bytes
    assert [tuple(x.shape) for x in ds.deltas] == [tuple(local(p).shape) for p in sh[:3]]
    stats_s = ds.apply(norms_of=sh)
    assert abs(float(stats_s.total_norm) - float(expected_total)) < 1e-5, (scale, float(stats_s.total_norm), float(expected_total))
    clip_grad_norm(sh, 1.0, stats_s.total_norm)
    for p, q in zip(ref, sh):
        assert torch.allclose(q.grad.full_tensor(), p.grad, atol=1e-6), (scale, (q.grad.full_tensor() - p.grad).abs().max())
    assert abs(stats_s.mean_coefficient - stats.mean_coefficient) < 1e-5
assert row_range(sh[1]) == ((0, 1) if rank == 0 else (1, 1))
assert abs(global_norm([q.grad for q in sh]) - global_norm([p.grad for p in ref])) < 1e-5
print("ok", flush=True)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_drift_on_sharded_parameters_equals_the_unsharded_formula(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script)]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2, proc.stdout  # both ranks got to the end (their lines may interleave)
