"""Forward+backward time of a model with IADA blocks over the same model without them.

A random model of Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864) with the vocabulary reduced to 8,192 (from 151,936: the output head, which IADA does not
touch, would otherwise be a third of the model), one sequence of 1024 tokens, next-token loss.
Repetitions alternate base and injected steps on the same model (the IADA hooks are attached
before and removed after each injected step, outside the timed region); the ratio of medians is
printed. Default IADA settings (block size 7: boundaries after layers 7, 14, 21).

    python bench/iada_overhead.py                                  # CPU, fp32
    python bench/iada_overhead.py --device cuda --dtype bf16 --reps 30
    python bench/iada_overhead.py --frozen-base                    # only IADA trains (LoRA-like)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from surgeon import modeling_surgeon as modeling
from surgeon.iada import IadaConfig, add_iada


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=896, num_hidden_layers=args.layers, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=args.vocab, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return Qwen2ForCausalLM(config).to(device=args.device, dtype=dtype)


def step(model: torch.nn.Module, ids: torch.Tensor, device: str) -> float:
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


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
    parser.add_argument("--frozen-base", action="store_true", help="Base weights frozen: only IADA gets gradients.")
    args = parser.parse_args()

    model = build(args)
    model.train()
    if args.frozen_base:
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # keeps the backward running through the base
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    config = IadaConfig(block_size=args.block_size, mode=args.mode)
    times: dict[str, list[float]] = {"base": [], "iada": []}
    for rep in range(args.warmup + args.reps):
        for name in ("base", "iada"):
            if name == "iada":
                module = add_iada(model, config)
                with torch.no_grad():  # non-zero weights, as after training
                    for p in module.parameters():
                        p.normal_(0, 0.02)
            seconds = step(model, ids, args.device)
            if name == "iada":
                modeling.remove_module(model, "iada")
            if rep >= args.warmup:
                times[name].append(seconds)
    base, iada = statistics.median(times["base"]), statistics.median(times["iada"])
    boundaries = args.layers // args.block_size
    print(
        f"device={args.device} dtype={args.dtype} batch={args.batch} seq={args.seq} layers={args.layers} "
        f"vocab={args.vocab} boundaries={boundaries} mode={args.mode} frozen_base={args.frozen_base} reps={args.reps}"
    )
    print(f"base median {base * 1000:.1f} ms, iada median {iada * 1000:.1f} ms, ratio {iada / base:.4f}")


if __name__ == "__main__":
    main()
