"""Sharded training (``--fsdp``, FSDP2 on 2 CPU processes with gloo) against one unsharded
process with the same global batch: the same weights for full fine-tuning with DRIFT (each
scale) and fixed λ, dynamic λ, LoRA and IADA; a sharded resume continues exactly.

Both sides run as fresh processes with one intra-op thread (``run_surgeon``), several commands per
process (``train_driver.py``), so they compare like with like. They still differ in the order of
a few sums over ranks (gradient norms, ⟨g,Δ⟩, the dynamic λ's norms), so weights agree to 1e-5:
0.3% of the largest change three steps at lr 1e-3 can make."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, run_surgeon
from safetensors.torch import load_file

DRIVER = Path(__file__).with_name("train_driver.py")
TOL = 1e-5


@pytest.fixture(scope="module")
def prior(vlm, tmp_path_factory):
    from surgeon.demo import tiny
    from surgeon.drift.prior import PriorConfig, compute_prior

    root = tmp_path_factory.mktemp("fsdp-prior")
    reasoning = tiny.build_reasoning_llm(vlm, root / "r1", scale=0.5)
    compute_prior(PriorConfig(reasoning=str(reasoning), vlm=str(vlm), output=str(root / "prior")))
    return root / "prior"


@pytest.fixture(scope="module")
def iada_vlm(vlm, tmp_path_factory):
    from surgeon.modules.iada import IadaConfig, inject_iada

    return inject_iada(str(vlm), tmp_path_factory.mktemp("fsdp-iada") / "vlm-iada", IadaConfig(block_size=2)).output


def drive(jobs: list, tmp: Path, nproc: int, nodes: int = 1) -> None:
    """Run the driver's jobs on ``nproc`` processes (torchrun for 2) with one thread each; with
    ``nodes`` = 2, as two torchrun agents of one process each that meet by c10d rendezvous, as two
    machines would (both on this one)."""
    path = tmp / f"jobs-{nproc}-{len(list(tmp.glob('jobs-*')))}.json"
    path.write_text(json.dumps([[str(a) for a in job] if isinstance(job, list) else job for job in jobs]))
    if nodes > 1:
        import os
        import subprocess

        port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "SURGEON_DEBUG": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"surgeon-{port}", str(DRIVER), str(path)]  # fmt: skip
        agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(nodes)]
        outputs = [a.communicate(timeout=900) for a in agents]
        for agent, (_, err) in zip(agents, outputs):
            assert agent.returncode == 0, err[-4000:]
        return
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(DRIVER), str(path)]  # fmt: skip
    else:
        cmd = [sys.executable, str(DRIVER), str(path)]
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SURGEON_DEBUG": "1"}
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_same(one: Path, two: Path, tol: float = TOL) -> None:
    a, b = weights(one), weights(two)
    assert a and a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    worst = max((float((a[k].float() - b[k].float()).abs().max()), k) for k in a)
    assert worst[0] <= tol, (one.name, *worst)


CASES = {
    "drift-cosine": ["--full", "--prior", "PRIOR", "--perception-weight", "0.7"],
    "drift-gradnorm": ["--full", "--prior", "PRIOR", "--drift-scale", "gradnorm", "--drift-alpha", "0.5", "--perception-weight", "0.3"],
    "drift-absolute": ["--full", "--prior", "PRIOR", "--drift-scale", "absolute", "--drift-alpha", "1e-2", "--perception-weight", "0.5"],
    "dynamic": ["--full", "--perception-weight", "dynamic", "--eval-set", "EVAL", "--eval-every", "2", "--eval-limit", "6", "--eval-max-new-tokens", "4"],
    "lora": [],
    "merged-lora": ["--merge-lora"],
    "iada": ["IADA"],
    "vision-checkpointing": ["--train-vision", "--gradient-checkpointing"],
    "image-lora": ["--image-lora", "HEADS"],
    "packed-dynamic-drift": ["--full", "--prior", "PRIOR", "--perception-weight", "dynamic", "--packing"],
    "drift-lora": ["--prior", "PRIOR", "--gradient-checkpointing"],
    "packed-iada-checkpointing": ["IADA", "--packing", "--gradient-checkpointing"],
}


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    from surgeon.heads.score import HeadScores, write_heads

    selected = [[1], [0, 1], [], [0]]  # the tiny model's 4 layers × 2 KV heads
    scores = [[1.0, 1.0] for _ in selected]
    result = HeadScores("tiny", "gate", 4, 2, 16, 64, scores, 4, 0.5, None, [len(r) for r in selected], selected)
    return write_heads(result, tmp_path_factory.mktemp("fsdp-heads") / "heads.json")


def _args(name: str, vlm, iada_vlm, data, prior, out: Path, accum: int, heads=None) -> list:
    swap = {"PRIOR": str(prior), "HEADS": str(heads), "EVAL": f"shapes={data}"}
    extra = [swap.get(a, a) for a in CASES[name] if a != "IADA"]
    model = iada_vlm if "IADA" in CASES[name] else vlm
    common = ["--data", data, "--lr", "1e-3", "--seed", "3", "--batch-size", "2", "--max-steps", "3", "--warmup-ratio", "0"]
    return [model, *common, *extra, "-o", out, "--grad-accum", accum]


@pytest.mark.slow
def test_drift_through_lora_on_two_replicated_processes_gives_the_weights_of_one(vlm, iada_vlm, data, prior, tmp_path):
    """DDP runs its backward on the loss times the world size: the k each process measures must be
    of the loss's own gradient, or gradnorm and adaptive_cosine bend by world× too much."""
    cases = {"cosine": ["--prior", str(prior)], "gradnorm": ["--prior", str(prior), "--drift-scale", "gradnorm", "--perception-weight", "0.5"]}
    base = ["--data", data, "--lr", "1e-3", "--seed", "3", "--batch-size", "2", "--max-steps", "3", "--warmup-ratio", "0"]
    drive([[vlm, *base, *extra, "-o", tmp_path / f"{n}-2", "--grad-accum", 1] for n, extra in cases.items()], tmp_path, 2)
    drive([[vlm, *base, *extra, "-o", tmp_path / f"{n}-1", "--grad-accum", 2] for n, extra in cases.items()], tmp_path, 1)
    for name in cases:
        assert_same(tmp_path / f"{name}-1", tmp_path / f"{name}-2")


@pytest.mark.slow
def test_two_sharded_processes_give_the_weights_of_one(vlm, iada_vlm, data, prior, heads, tmp_path):
    bf16 = [*_args("lora", vlm, iada_vlm, data, prior, tmp_path / "bf16-2", 1), "--fsdp", "--mixed-precision", "bf16", "--full"]
    drive([*[[*_args(n, vlm, iada_vlm, data, prior, tmp_path / f"{n}-2", 1, heads), "--fsdp"] for n in CASES], bf16], tmp_path, 2)
    drive([_args(n, vlm, iada_vlm, data, prior, tmp_path / f"{n}-1", 2, heads) for n in CASES], tmp_path, 1)
    for name in CASES:
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        assert_same(one, two)  # (evaluating between steps changes nothing of the training)
        record = json.loads((two / "surgeon.json").read_text())["stats"]
        assert record["sharded"] is True and record["world_size"] == 2, name
        lines = (two / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2, 3], name
    # evaluation while training: the same accuracy and KL(base ‖ current) sharded as on one process
    evals = [[json.loads(x) for x in (tmp_path / f"dynamic-{n}" / "metrics.jsonl").read_text().splitlines() if "kl_base" in x] for n in (1, 2)]
    assert [m["step"] for m in evals[0]] == [m["step"] for m in evals[1]] == [2, 3]
    for a, b in zip(*evals):
        assert a["eval/shapes/accuracy"] == b["eval/shapes/accuracy"] and a["eval/shapes/n"] == b["eval/shapes/n"] == 6
        assert a["kl_base"] == pytest.approx(b["kl_base"], rel=1e-3, abs=1e-6)
    # Δ is sharded like its parameters: each rank holds half of it (the tiny model's rows split evenly)
    drift = [json.loads((tmp_path / f"drift-cosine-{n}" / "surgeon.json").read_text())["stats"]["drift"] for n in (1, 2)]
    assert drift[0]["delta_bytes_per_process"] == 4 * drift[0]["parameters"]  # the tiny prior is fp32
    assert drift[1]["delta_bytes_per_process"] == drift[0]["delta_bytes_per_process"] // 2
    # outputs are the standard folders: a full model, a peft adapter, IADA blocks beside the adapter
    assert (tmp_path / "drift-cosine-2" / "model.safetensors").exists()
    assert (tmp_path / "lora-2" / "adapter_model.safetensors").exists()
    assert (tmp_path / "iada-2" / "surgeon-modules.safetensors").exists()
    assert (tmp_path / "image-lora-2" / "surgeon-image_lora.safetensors").exists()
    # mixed precision: bf16 compute on the all-gathered copies, fp32 master weights and reduction
    record = json.loads((tmp_path / "bf16-2" / "surgeon.json").read_text())["stats"]
    assert record["precision"] == {"mixed": "bf16", "trained": "float32", "frozen": "bfloat16"}
    fp32 = [json.loads(x)["loss"] for x in (tmp_path / "lora-1" / "metrics.jsonl").read_text().splitlines()]
    bf16_losses = [json.loads(x)["loss"] for x in (tmp_path / "bf16-2" / "metrics.jsonl").read_text().splitlines()]
    assert abs(bf16_losses[0] - fp32[0]) < 0.05 * fp32[0]  # the same first forward pass (LoRA starts as the identity), to bf16 accuracy
    assert weights(tmp_path / "bf16-2")["model.safetensors:lm_head.weight"].dtype == torch.float32


@pytest.mark.slow
def test_sharded_resume_continues_exactly_and_needs_the_same_world_size(vlm, data, prior, tmp_path):
    args = [vlm, "--data", data, "--lr", "1e-3", "--seed", "1", "--batch-size", "1", "--max-steps", "5", "--warmup-ratio", "0",
            "--full", "--prior", prior, "--save-steps", "2", "--fsdp"]  # fmt: skip
    drive([
        [*args, "-o", tmp_path / "whole"],
        {"args": [str(a) for a in [*args, "-o", tmp_path / "cut"]], "stop_after_checkpoint": 4},
    ], tmp_path, 2)  # fmt: skip
    assert not (tmp_path / "cut").exists()
    ckpt = tmp_path / "cut-checkpoints" / "checkpoint-4"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer-rank00000.safetensors", "optimizer-rank00001.safetensors", "rng-rank00000.safetensors",
        "rng-rank00001.safetensors", "state.json", "trainable-rank00000.safetensors", "trainable-rank00001.safetensors",
    ]  # fmt: skip
    halves = [load_file(str(ckpt / f"trainable-rank0000{r}.safetensors")) for r in (0, 1)]
    full = load_file(str(vlm / "model.safetensors"))
    name = next(k for k in halves[0] if k.endswith("layers.0.mlp.up_proj.weight"))
    rows = full["model.layers.0.mlp.up_proj.weight"].shape[0]
    assert halves[0][name].shape[0] == halves[1][name].shape[0] == rows // 2  # each rank holds its rows

    other = run_surgeon(["train", *[str(a) for a in args], "-o", tmp_path / "cut", "--resume"], nproc=1)
    assert other.returncode == 1 and "Error: resume:" in other.stderr
    assert "sharded over 2 processes" in other.stderr and "--nproc-per-node 2" in other.stderr

    drive([[*args, "-o", tmp_path / "cut", "--resume"]], tmp_path, 2)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same ranks, same sums: bit for bit
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_two_nodes_by_c10d_rendezvous_train_sharded_and_resume(vlm, data, tmp_path):
    """Two torchrun agents (one process each, --nnodes 2, c10d rendezvous) train packed and
    sharded; a run stopped after a checkpoint and resumed on two nodes ends with the weights of one
    that never stopped, bit for bit."""
    args = [vlm, "--data", data, "--lr", "1e-3", "--seed", "2", "--batch-size", "2", "--max-steps", "3", "--warmup-ratio", "0",
            "--full", "--packing", "--save-steps", "1", "--fsdp"]  # fmt: skip
    drive([[*args, "-o", tmp_path / "whole"], {"args": [str(a) for a in [*args, "-o", tmp_path / "cut"]], "stop_after_checkpoint": 2}], tmp_path, 2, nodes=2)
    assert (tmp_path / "cut-checkpoints" / "checkpoint-2" / "trainable-rank00001.safetensors").exists()
    drive([[*args, "-o", tmp_path / "cut", "--resume"]], tmp_path, 2, nodes=2)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "whole" / "surgeon.json").read_text())["stats"]["world_size"] == 2


@pytest.mark.slow
def test_accelerate_launch_with_fsdp_shards_and_bad_launches_are_clear(cli, vlm, data, tmp_path, monkeypatch):
    import os
    import subprocess

    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "surgeon.cli", "train", str(vlm), "--data", str(data), "-o", str(out), "--max-steps", "2",
           "--full", "--batch-size", "1"]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "surgeon.json").read_text())["stats"]
    assert stats["sharded"] is True and stats["world_size"] == 2
    assert "view tensor" not in proc.stderr and "Traceback" not in proc.stderr

    one = cli("train", vlm, "--data", data, "-o", tmp_path / "one", "--max-steps", "1", "--full", "--fsdp")
    assert one.exit_code == 0, one.output
    assert "one process: --fsdp has nothing to shard over" in one.stderr
    assert json.loads((tmp_path / "one" / "surgeon.json").read_text())["stats"]["sharded"] is False

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    refused = cli("train", vlm, "--data", data, "-o", tmp_path / "ds", "--max-steps", "1")
    assert refused.exit_code == 1 and refused.stderr.startswith("Error: distributed:") and "--fsdp" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "ds").exists()
