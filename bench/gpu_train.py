"""Training throughput and peak memory on one GPU: ``surgeon train``'s variants against TRL's
SFTTrainer on the same model and the same batches.

    python bench/gpu_train.py                                   # 2B-shaped Qwen2.5-VL on cuda, bf16, SDPA
    python bench/gpu_train.py --tiny --device cpu --steps 2     # the tiny shape: checks the script runs

Builds under ``--work`` (default ``bench/_work/gpu``) a Qwen2.5-VL whose language model has
Qwen2-VL-2B's shapes (hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocabulary
151,936; random bf16 weights; the vision tower stays small), a random text LLM of the same shapes
and the DRIFT prior between them, an Image-LoRA head selection (one KV head per layer), and
``--batch`` × ``--samples`` copies of one image+text sample of about ``--seq`` tokens, so every
step of every case sees the same number of tokens. Then, in this process, one case after the
other (the peak memory counter is reset between cases):

    lora         surgeon train (LoRA r=16 on attn+mlp)
    full         surgeon train --full
    full+drift   surgeon train --full --prior PRIOR
    lora+iada    surgeon train on the model with IADA blocks (surgeon inject-iada): LoRA beside them
    image-lora   surgeon train --image-lora HEADS
    lora+packed  surgeon train --packing (LoRA), with --attn (flash_attention_2 where flash-attn is installed)
    full+packed  surgeon train --full --packing
    full-logits  surgeon train --full --no-chunked-loss (the full [tokens × vocabulary] logits, as before)
    trl-lora     trl.SFTTrainer with the same LoRA (peft_config)
    trl-full     trl.SFTTrainer, full fine-tuning of the same parameters' model

Reported per case: tokens/s (median over the steps after ``--warmup``) and peak memory
(``torch.cuda.max_memory_allocated``; on the CPU, the process's peak RSS so far, which only grows),
and surgeon/TRL ratios for LoRA and full fine-tuning. Results also go to
``<work>/gpu-train.json``. Fits in 10 minutes on one H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE_2B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)  # fmt: skip
SHAPE_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
# about 23M parameters: the size at which training memory was compared with TRL on the CPU
SHAPE_23M = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=7, num_attention_heads=8, num_key_value_heads=8)
SHAPES = {"tiny": SHAPE_TINY, "23m": SHAPE_23M, "2b": SHAPE_2B}
CASES = ("lora", "full", "full+drift", "lora+iada", "image-lora", "lora+packed", "full+packed", "full-logits", "trl-lora", "trl-full")


def build(work: Path, shape_name: str, dtype: str) -> dict[str, Path]:
    """The VLM, a same-shaped random LLM, their prior, a head selection (cached under ``work``)."""
    import torch

    from surgeon.demo import tiny as tiny_models
    from surgeon.heads.score import HeadScores, write_heads
    from surgeon.drift.prior import PriorConfig, compute_prior

    shape = SHAPES[shape_name]
    from surgeon.modules.iada import IadaConfig, inject_iada

    vlm, llm, prior, heads = work / "vlm", work / "llm", work / "prior", work / "heads.json"
    if not (vlm / "config.json").exists():
        tiny_models.build("qwen2_5_vl", vlm, dtype=getattr(torch, dtype), **shape)
    if not (llm / "config.json").exists():
        tiny_models.build("qwen2", llm, seed=1, dtype=getattr(torch, dtype), **shape)
    if not (prior / "surgeon.json").exists():
        compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(prior)))
    if not (work / "vlm-iada" / "config.json").exists():  # blocks every 7 layers (the default); every 2 in the tiny shape
        inject_iada(str(vlm), work / "vlm-iada", IadaConfig(block_size=2 if shape_name == "tiny" else 7))
    if not heads.exists():
        layers, kv = shape["num_hidden_layers"], shape["num_key_value_heads"]
        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        selected = [[0] for _ in range(layers)]
        scores = [[1.0] * kv for _ in range(layers)]
        write_heads(HeadScores("bench", "gate", layers, kv, head_dim, shape["hidden_size"], scores, layers, 0.5, None,
                               [1] * layers, selected), heads)  # fmt: skip
    return {"vlm": vlm, "llm": llm, "prior": prior, "heads": heads, "vlm-iada": work / "vlm-iada"}


def make_data(work: Path, model: Path, seq: int, count: int) -> tuple[Path, int]:
    """``count`` copies of one sample (a rendered image, a question, a tagged answer) padded with
    answer text to about ``seq`` tokens; returns the data file and its tokens per sample."""
    from PIL import Image, ImageDraw

    from surgeon.data.scan import load_samples
    from surgeon.data.encoding import SampleEncoder

    folder = work / f"data-{seq}"
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill="red")
    image.save(folder / "circle.png")
    encoder = SampleEncoder.from_pretrained(model, max_length=seq * 2)
    words, tokens = 8, 0
    while True:
        answer = "<perception>One red circle.</perception> " + " ".join(["The red circle is above the blue square."] * words)
        sample = {"messages": [
            {"role": "user", "content": [{"type": "image", "image": "circle.png"}, {"type": "text", "text": "What is shown?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]}  # fmt: skip
        (folder / "data.jsonl").write_text(json.dumps(sample) + "\n")
        tokens = len(encoder.encode(load_samples(folder / "data.jsonl")[0]).input_ids)
        if tokens >= seq or words > 4096:
            break
        words = max(words + 1, int(words * seq / max(tokens, 1)))
    (folder / "data.jsonl").write_text((json.dumps(sample) + "\n") * count)
    return folder / "data.jsonl", tokens


def peak_memory(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_surgeon(case: str, paths: dict, data: Path, out: Path, args: argparse.Namespace, tokens: int) -> dict:
    from surgeon.training.config import TrainConfig
    from surgeon.training.loop import train

    options = {"lora": {}, "full": {"full": True}, "full+drift": {"full": True, "prior": str(paths["prior"])},
               "lora+iada": {}, "image-lora": {"image_lora": str(paths["heads"])},
               "lora+packed": {"packing": True, "attn": args.attn}, "full+packed": {"full": True, "packing": True, "attn": args.attn},
               "full-logits": {"full": True, "chunked_loss": False}}[case]  # fmt: skip
    config = TrainConfig(
        model=str(paths["vlm-iada" if case == "lora+iada" else "vlm"]), data=str(data), output=str(out), max_steps=args.warmup + args.steps, batch_size=args.batch,
        lr=1e-5, warmup_ratio=0.0, max_length=args.seq * 2, overwrite=True, mixed_precision=args.mixed_precision, **options,
    )  # fmt: skip
    reset_peak(args.device)
    train(config)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][args.warmup :]
    return {"tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps), "peak_memory": peak_memory(args.device)}


def run_trl(case: str, paths: dict, data: Path, out: Path, args: argparse.Namespace, tokens: int) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sample = json.loads(data.read_text().splitlines()[0])
    image = Image.open(data.parent / "circle.png").convert("RGB")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["messages"][0]["content"][1]["text"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": sample["messages"][1]["content"][0]["text"].replace("<perception>", "").replace("</perception>", "")}]},
    ]  # fmt: skip
    n = len(data.read_text().splitlines())
    dataset = Dataset.from_list([{"messages": messages, "images": [image]} for _ in range(n)])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: object, **k: object) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: object, **k: object) -> None:
            times.append(time.perf_counter() - self.start)

    bf16 = args.mixed_precision == "bf16" or (args.mixed_precision == "auto" and args.device.startswith("cuda"))
    reset_peak(args.device)
    model = AutoModelForImageTextToText.from_pretrained(paths["vlm"], dtype=torch.bfloat16 if bf16 and case == "trl-lora" else torch.float32)
    if case == "trl-full":
        for name, p in model.named_parameters():  # like surgeon --full: the language model trains, the vision tower not
            p.requires_grad_("visual" not in name)
    peft_config = None
    if case == "trl-lora":
        from peft import LoraConfig

        from surgeon.training.lora import lora_target_regex

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_regex(model, "attn,mlp"))
    sft = SFTConfig(
        output_dir=str(out), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-5,
        bf16=bf16, logging_steps=1, report_to="none", save_strategy="no", max_length=args.seq * 2,
        use_cpu=not args.device.startswith("cuda"), dataloader_num_workers=0, lr_scheduler_type="cosine", disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=AutoProcessor.from_pretrained(paths["vlm"]),
                         peft_config=peft_config, callbacks=[Clock()])  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    seen = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    per_step = [float(b) - float(a) for a, b in zip([0.0, *seen], seen)][args.warmup :]  # TRL's own token count
    return {"tokens_per_s": statistics.median(per_step) / statistics.median(times[args.warmup :]), "peak_memory": peak_memory(args.device)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny shape (for a check on the CPU)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="tiny, 23m or 2b (default 2b; --tiny: tiny)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (the run uses every visible device's first)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype the random checkpoints are saved in")
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sample (about)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--attn", default="sdpa", help="attention of the packed cases (flash_attention_2 needs flash-attn)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "gpu")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --device cpu (and --tiny) to check the script")
    shape = args.shape or ("tiny" if args.tiny else "2b")
    work = args.work / shape
    work.mkdir(parents=True, exist_ok=True)
    paths = build(work, shape, args.dtype)
    data, tokens = make_data(work, paths["vlm"], args.seq, args.batch * (args.warmup + args.steps))
    results: dict[str, dict] = {}
    for case in args.cases.split(","):
        run = run_trl if case.startswith("trl-") else run_surgeon
        results[case] = run(case, paths, data, work / f"out-{case}", args, tokens)
        r = results[case]
        print(f"{case:<11} {r['tokens_per_s']:10.0f} tokens/s   peak memory {r['peak_memory'] / 2**30:6.2f} GiB", flush=True)
    for ours, theirs in (("lora", "trl-lora"), ("full", "trl-full")):
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            print(f"{ours}: surgeon/TRL tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                  f"peak memory {a['peak_memory'] / b['peak_memory']:.2f}x")  # fmt: skip
    report = {"device": args.device, "tokens_per_sample": tokens, "batch": args.batch, "results": results}
    (work / "gpu-train.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
