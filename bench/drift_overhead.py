"""DRIFT's step-time overhead over a plain full fine-tuning step, measured in one run.

A Qwen2-0.5B-shaped random model (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864; vocabulary cut to 32,000 to fit the machine, which only shrinks the embedding and head) is
fully fine-tuned with AdamW in fp32 on CPU. Both variants run the same step (forward, backward,
clip, AdamW) on the same batch, as ``surgeon train`` takes it; the DRIFT variant also biases
every attention and MLP weight and bias (the default ``attn,mlp`` prior, 358M parameters) with
``adaptive_cosine``, and its clipping reuses the gradient norms DRIFT derived. Steps
alternate between the variants so that machine noise hits both alike; the medians are compared.

    python bench/drift_overhead.py [--steps 6] [--seq 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant (after one warm-up each)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from surgeon.drift.bias import Drift, clip_grad_norm
    from surgeon.anatomy.decoder import lm_parameters

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    targets = [
        (name, p, torch.randn_like(p) * 0.01)
        for name, p in lm_parameters(model)
        if name.startswith("layers.") and ("self_attn" in name or "mlp" in name)
    ]
    drift = Drift(targets, alpha=1.0, scale="adaptive_cosine")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    print(f"model: {sum(p.numel() for p in params) / 1e6:.0f}M parameters; DRIFT biases {drift.numel / 1e6:.0f}M in {len(targets)} tensors")

    def step(with_drift: bool) -> float:
        """One optimiser step as ``surgeon train`` takes it: DRIFT, then clipping (which reuses
        the gradient norms DRIFT derived), then AdamW."""
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        total = drift.apply(norms_of=params).total_norm if with_drift else None
        clip_grad_norm(params, 1.0, total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(False), step(True)  # warm-up: allocator, AdamW state
    plain, biased, apply_only = [], [], []
    for _ in range(args.steps):
        plain.append(step(False))
        biased.append(step(True))
    for _ in range(3):  # DRIFT's own cost on a full set of gradients
        model(input_ids=ids, labels=ids).loss.backward()
        start = time.perf_counter()
        drift.apply()
        apply_only.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
    p, b = statistics.median(plain), statistics.median(biased)
    print(f"plain step   median {p:.3f} s  ({', '.join(f'{x:.2f}' for x in plain)})")
    print(f"DRIFT step   median {b:.3f} s  ({', '.join(f'{x:.2f}' for x in biased)})")
    print(f"drift.apply  median {statistics.median(apply_only):.3f} s")
    print(f"ratio DRIFT / plain = {b / p:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
