"""Image-LoRA against peft LoRA on v_proj: adapter FLOPs and training step time at two visual-token fractions.

A random Qwen2.5-VL whose language model is small but not tiny (hidden 512, 8 layers, 8 heads,
2 KV heads of size 64, intermediate 1408, vocabulary 4096) with a 2-block vision tower, one
sample of ``--seq`` tokens of which one image fills a chosen share, next-token loss. Three arms on
identical weights, base frozen in all of them:

    base        no adapter (the input embeddings train, so the backward pass runs through every
                layer as it does in the other arms; its cost is subtracted to isolate the adapter)
    image-lora  Image-LoRA r=8, α=16 on one KV head in every layer (visual tokens only)
    lora        peft LoRA r=8, α=16 on every layer's v_proj (all tokens)

Adapter FLOPs are measured with torch's FlopCounterMode (forward, and forward+backward) as the
arm's count minus the base count, and compared with ``surgeon.modules.image_lora.flops_report`` and
docs/methods.md §4's (T_v/T)·(d + H_sel·d_h)/(d + H_kv·d_h). Step time (forward, backward, AdamW) is the
median over repetitions in rotating order; wall and process CPU time are both printed.

    python bench/image_lora.py --threads 1
    python bench/image_lora.py --device cuda --reps 20 --seq 4096
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from surgeon.modules.image_lora import ImageLoraConfig, add_image_lora, batch_flops

HIDDEN, LAYERS, HEADS, KV, HEAD_DIM, VOCAB = 512, 8, 8, 2, 64, 4096
IMAGE, VIDEO, START, END = 4000, 4001, 4002, 4003


def build(device: str) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                         intermediate_size=1408, vocab_size=VOCAB, max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=HIDDEN,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).to(device)


def sample(seq: int, fraction: float, device: str) -> dict[str, torch.Tensor]:
    """One sequence of ``seq`` tokens: text, <vision_start>, a square image of ≈ fraction·seq tokens, <vision_end>, text."""
    side = max(1, round((fraction * seq) ** 0.5))  # merged grid side: side² image tokens
    n = side * side
    grid = torch.tensor([[1, 2 * side, 2 * side]])  # patches before the 2×2 merge
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, 3900, (seq - n - 2,), generator=gen)
    head = text[: len(text) // 4]
    ids = torch.cat([head, torch.tensor([START]), torch.full((n,), IMAGE), torch.tensor([END]), text[len(head):]])
    mm = (ids == IMAGE).long()
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=gen)
    batch = {"input_ids": ids[None], "attention_mask": torch.ones(1, seq, dtype=torch.long), "mm_token_type_ids": mm[None],
             "pixel_values": pixels, "image_grid_thw": grid}  # fmt: skip
    return {k: v.to(device) for k, v in batch.items()}


def arms(device: str) -> dict[str, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model

    base = build(device)
    base.requires_grad_(False)
    made = {"base": base, "image-lora": copy.deepcopy(base), "lora": copy.deepcopy(base)}
    add_image_lora(made["image-lora"], [[0]] * LAYERS, ImageLoraConfig(rank=8, alpha=16))
    made["lora"] = get_peft_model(
        made["lora"], LoraConfig(r=8, lora_alpha=16, target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.v_proj")
    )
    for name, model in made.items():
        model.get_input_embeddings().weight.requires_grad_(True)  # the same backward pass in every arm
        with torch.no_grad():  # non-zero adapters, as after training
            for n, p in model.named_parameters():
                if ("surgeon" in n or "lora_" in n) and p.requires_grad:
                    p.normal_(0, 0.02)
        model.train()
    return made


def flops(model: torch.nn.Module, batch: dict, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(**batch).logits
        if backward:
            out.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, device: str) -> tuple[float, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch["input_ids"][0, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 makes CPU time exact).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = arms(args.device)
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for n, m in models.items()}
    print(f"device={args.device} seq={args.seq} layers={LAYERS} hidden={HIDDEN} kv_heads={KV} head_dim={HEAD_DIM} "
          f"rank=8 image-lora heads=1 per layer reps={args.reps} threads={torch.get_num_threads()}")  # fmt: skip
    print("| visual fraction | adapter FLOPs fwd: Image-LoRA / LoRA | fwd+bwd | report | formula (docs/methods.md §4) "
          "| LoRA adapter share of step FLOPs | step ms base / Image-LoRA / LoRA (wall) | Image-LoRA / LoRA step (wall, cpu) |")
    for fraction in args.fractions:
        batch = sample(args.seq, fraction, args.device)
        report = batch_flops(models["image-lora"], batch)
        measured = {}
        for backward in (False, True):
            counts = {n: flops(m, batch, backward) for n, m in models.items()}
            measured[backward] = (counts["image-lora"] - counts["base"]) / (counts["lora"] - counts["base"])
        share = (counts["lora"] - counts["base"]) / counts["lora"]  # LoRA's adapter share of a step's fwd+bwd FLOPs
        formula = report.visual_fraction * (HIDDEN + 1 * HEAD_DIM) / (HIDDEN + KV * HEAD_DIM)
        times: dict[str, list[tuple[float, float]]] = {n: [] for n in models}
        names = list(models)
        for rep in range(args.warmup + args.reps):
            order = names[rep % 3:] + names[: rep % 3]  # rotate: no arm always runs first
            for name in order:
                t = step(models[name], optimizers[name], batch, args.device)
                if rep >= args.warmup:
                    times[name].append(t)
        med = {n: [statistics.median(t[i] for t in times[n]) for i in (0, 1)] for n in names}
        print(
            f"| {report.visual_fraction:.3f} ({report.visual_tokens}/{report.tokens}) | {measured[False]:.4f} | "
            f"{measured[True]:.4f} | {report.ratio:.4f} | {formula:.4f} | {share:.2%} | "
            f"{med['base'][0] * 1e3:.0f} / {med['image-lora'][0] * 1e3:.0f} / {med['lora'][0] * 1e3:.0f} | "
            f"{med['image-lora'][0] / med['lora'][0]:.3f}, {med['image-lora'][1] / med['lora'][1]:.3f} |"
        )


if __name__ == "__main__":
    main()
