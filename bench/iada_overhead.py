"""Forward+backward time of a model with IADA blocks over the same model without them.

A random model of Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864) with the vocabulary reduced to 8,192 (from 151,936: the output head, which IADA does not
touch, would otherwise be a third of the model), one sequence of 1024 tokens, next-token loss.
Repetitions alternate base and injected steps on the same model in ABBA order (the IADA hooks
are attached before and removed after each injected step, outside the timed region); the ratio
of medians is printed, for wall time and for this process's CPU time (on a shared machine the
CPU time of one thread is the steadier measure of the added work). Default IADA settings
(block size 7: boundaries after layers 7, 14, 21).

    python bench/iada_overhead.py --threads 1                      # CPU, fp32, one thread
    python bench/iada_overhead.py --device cuda --dtype bf16 --reps 30
    python bench/iada_overhead.py --frozen-base                    # only IADA trains (LoRA-like)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from surgeon.modules import modeling_surgeon as modeling
from surgeon.modules.iada import IadaConfig, add_iada


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=896, num_hidden_layers=args.layers, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=args.vocab, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return Qwen2ForCausalLM(config).to(device=args.device, dtype=dtype)


def step(model: torch.nn.Module, ids: torch.Tensor, device: str) -> tuple[float, float]:
    """One forward+backward: (wall seconds, CPU seconds of this process, all threads)."""
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=7)
    parser.add_argument("--mode", choices=["adaptive", "fixed"], default="adaptive")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 makes CPU time exact).")
    parser.add_argument("--frozen-base", action="store_true", help="Base weights frozen: only IADA gets gradients.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    model.train()
    if args.frozen_base:
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # keeps the backward running through the base
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    config = IadaConfig(block_size=args.block_size, mode=args.mode)
    times: dict[str, list[tuple[float, float]]] = {"base": [], "iada": []}
    for rep in range(args.warmup + args.reps):
        for name in ("base", "iada") if rep % 2 == 0 else ("iada", "base"):  # ABBA: no order bias
            if name == "iada":
                module = add_iada(model, config)
                with torch.no_grad():  # non-zero weights, as after training
                    for p in module.parameters():
                        p.normal_(0, 0.02)
            measured = step(model, ids, args.device)
            if name == "iada":
                modeling.remove_module(model, "iada")
            if rep >= args.warmup:
                times[name].append(measured)
    print(
        f"device={args.device} dtype={args.dtype} batch={args.batch} seq={args.seq} layers={args.layers} "
        f"vocab={args.vocab} boundaries={args.layers // args.block_size} mode={args.mode} "
        f"frozen_base={args.frozen_base} reps={args.reps} threads={torch.get_num_threads()}"
    )
    for i, clock in enumerate(("wall", "cpu")):
        base = [t[i] for t in times["base"]]
        iada = [t[i] for t in times["iada"]]
        print(f"{clock} base ms: " + " ".join(f"{t * 1000:.0f}" for t in base))
        print(f"{clock} iada ms: " + " ".join(f"{t * 1000:.0f}" for t in iada))
        ratio = statistics.median(iada) / statistics.median(base)
        print(f"{clock}: base median {statistics.median(base) * 1000:.1f} ms, iada median "
              f"{statistics.median(iada) * 1000:.1f} ms, ratio {ratio:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
