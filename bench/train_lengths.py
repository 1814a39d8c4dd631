"""Training at real lengths on the CPU: packed rows and the chunked loss against padded batches and
TRL's SFTTrainer, each case in a fresh process (so each peak RSS is its own), the cases alternating
in every round (a benchmark, not a test).

    python bench/train_lengths.py                 # throughput on length-mixed data, then the 1,900-token memory step
    python bench/train_lengths.py --tiny          # a small shape, seconds: checks the script runs

The model is a Qwen2.5-VL whose language model has hidden size 256, 4 layers, 4 heads and the real
151,936-token vocabulary (tied embeddings, as Qwen2-VL-2B), fp32. Throughput: ``--samples``
samples of log-uniform 32–2,048 tokens, a third with an image of mixed size, half of them
document-style (long prompt, short answer) and half reasoning-style (short question, long answer),
``--batch`` samples
per step, full fine-tuning:

    packed        surgeon train --packing (the chunked loss is the default)
    padded        surgeon train (right-padded micro-batches, chunked loss)
    padded-logits surgeon train --no-chunked-loss (what surgeon did before: padded, full logits)
    trl           trl.SFTTrainer, full fine-tuning, its defaults for this model on the CPU (padding;
                  its padding-free mode refuses Qwen-VL and Liger needs a GPU)

Reported: real (non-padding) tokens per second, median over the steps after the first; the share of
computed positions that were padding; peak RSS. Memory: one 1,900-token sample, one full
fine-tuning step (forward, backward, AdamW): surgeon, a plain transformers loop
(``model(**batch, labels=…)``, ``backward``, ``AdamW.step``) and TRL. Every figure is the median
of ``--rounds`` rounds; ratios are taken between medians of the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)  # fmt: skip
TINY = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=4096)
THROUGHPUT = ("packed", "padded", "padded-logits", "trl")
MEMORY = ("mem-surgeon", "mem-plain", "mem-trl")


def build(work: Path, tiny: bool) -> Path:
    import torch

    from surgeon.demo import tiny as tiny_models

    vlm = work / "vlm"
    if not (vlm / "config.json").exists():
        tiny_models.build("qwen2_5_vl", vlm, dtype=torch.float32, **(TINY if tiny else SHAPE))
    return vlm


def make_data(work: Path, vlm: Path, samples: int, longest: int, seed: int = 0, fixed: bool = False) -> Path:
    """Samples of log-uniform 32..``longest`` tokens (a third with an image of 56..224 pixels a side),
    half of them document-style (the length in the prompt, a one-line answer), half reasoning-style
    (a short question, the length in the answer)."""
    from PIL import Image, ImageDraw

    from surgeon.data.encoding import SampleEncoder

    folder = work / (f"data-{samples}-{longest}-fixed" if fixed else f"data-{samples}-{longest}-mixed")
    if (folder / "data.jsonl").exists():
        return folder / "data.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    encoder = SampleEncoder.from_pretrained(vlm)
    per_word = len(encoder.tokenizer("the red circle is above the blue square ", add_special_tokens=False)["input_ids"]) / 8
    rows = []
    for i in range(samples):
        target = longest if fixed else int(math.exp(rng.uniform(math.log(32), math.log(longest))))
        words = max(1, int((target - 24) / per_word))
        text = " ".join(rng.choice(["the", "red", "circle", "is", "above", "blue", "square", "so", "two", "answer"]) for _ in range(words))
        document = i % 2 == 1
        question: list = [{"type": "text", "text": f"{text}\nQuestion {i}: how many circles?" if document else f"Question {i}?"}]
        if i % 3 == 0:
            side = rng.choice([56, 112, 168, 224])
            image = Image.new("RGB", (side, side), "white")
            ImageDraw.Draw(image).ellipse((8, 8, side - 8, side - 8), fill="red")
            image.save(folder / f"{i}.png")
            question.insert(0, {"type": "image", "image": f"{i}.png"})
        answer = "<perception>One red circle.</perception> So one. Answer: 1" if document else f"<perception>One red circle.</perception> {text}. Answer: 2"
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------- one case, in its own process


def run_surgeon(case: str, vlm: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    from surgeon.training.config import TrainConfig
    from surgeon.training.loop import train

    options = {"packed": {"packing": True}, "padded": {}, "padded-logits": {"chunked_loss": False}, "mem-surgeon": {}}[case]
    config = TrainConfig(
        model=str(vlm), data=str(data), output=str(out), max_steps=args.steps + 1, batch_size=args.batch if case != "mem-surgeon" else 1,
        full=True, lr=1e-5, warmup_ratio=0.0, max_length=args.longest, mixed_precision="no", overwrite=True, seed=0, **options,
    )  # fmt: skip
    from dataclasses import replace

    from surgeon.training.plan import plan_for

    plan = plan_for(replace(config, max_length=min(config.max_length, args.memory_tokens + 64)) if case == "mem-surgeon" else config, 1, "cpu")
    train(config)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    real, pad = sum(m["tokens"] for m in steps), sum(m["padding"] for m in steps)
    return {"tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps), "padding": pad / max(real + pad, 1), "peak_rss": peak_rss(),
            "plan": plan.per_process_bytes}  # fmt: skip


def _trl_dataset(data: Path) -> tuple:
    from datasets import Dataset
    from PIL import Image

    rows = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        user, answer = row["messages"]
        images = [Image.open(data.parent / part["image"]).convert("RGB") for part in user["content"] if part["type"] == "image"]
        content = [{"type": "image"} if part["type"] == "image" else part for part in user["content"]]
        text = answer["content"].replace("<perception>", "").replace("</perception>", "")
        rows.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": text}]}],
                     "images": images})  # fmt: skip
    return Dataset.from_list(rows), len(rows)


def run_trl(case: str, vlm: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    dataset, _ = _trl_dataset(data)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: object, **k: object) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: object, **k: object) -> None:
            times.append(time.perf_counter() - self.start)

    model = AutoModelForImageTextToText.from_pretrained(vlm, dtype=torch.float32)
    for name, p in model.named_parameters():  # like surgeon --full: the language model trains, the vision tower not
        p.requires_grad_("visual" not in name)
    sft = SFTConfig(
        output_dir=str(out), max_steps=args.steps + 1, per_device_train_batch_size=args.batch if case == "trl" else 1, learning_rate=1e-5,
        logging_steps=1, report_to="none", save_strategy="no", max_length=args.longest, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=AutoProcessor.from_pretrained(vlm), callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    seen = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    per_step = [float(b) - float(a) for a, b in zip([0.0, *seen], seen)][1:]  # TRL's own count of real tokens
    rates = [n / t for n, t in zip(per_step, times[1:])]
    return {"tokens_per_s": statistics.median(rates) if rates else 0.0, "padding": None, "peak_rss": peak_rss()}


def run_plain(case: str, vlm: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """A plain transformers step: the model's own loss over the full logits, backward, AdamW."""
    import torch

    from surgeon.data.encoding import SampleEncoder
    from surgeon.data.scan import load_samples
    from surgeon.modules.folders import load_model

    encoder = SampleEncoder.from_pretrained(vlm, max_length=args.longest)
    batch = encoder.collate([encoder.encode(load_samples(data)[0])])
    batch.pop("perception_mask")
    model = load_model(vlm, dtype=torch.float32).train()
    for name, p in model.named_parameters():
        p.requires_grad_("visual" not in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(args.steps + 1):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"tokens_per_s": None, "padding": 0.0, "peak_rss": peak_rss()}


def one(case: str, args: argparse.Namespace) -> None:
    work = args.work
    vlm = build(work, args.tiny)
    if case.startswith("mem-"):
        data = make_data(work, vlm, 1, args.memory_tokens, seed=1, fixed=True)  # one sample of about 1,900 tokens
        args.longest = max(args.longest, args.memory_tokens + 256)
    else:
        data = make_data(work, vlm, args.samples, args.longest)
    run = {"trl": run_trl, "mem-trl": run_trl, "mem-plain": run_plain}.get(case, run_surgeon)
    result = run(case, vlm, data, work / f"out-{case}", args)
    (work / f"{case}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------- the rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small shape and short samples: checks the script runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per case (after one more, not measured)")
    parser.add_argument("--longest", type=int, default=2048)
    parser.add_argument("--memory-tokens", type=int, default=1900)
    parser.add_argument("--cases", default=",".join(THROUGHPUT + MEMORY))
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "lengths")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case in this process
    args = parser.parse_args()
    if args.tiny and not args.case:  # a case process gets the parent's values spelled out
        args.samples, args.longest, args.memory_tokens, args.rounds, args.steps = 12, 256, 200, 1, 1
        args.work = args.work.parent / (args.work.name + "-tiny")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.case:
        one(args.case, args)
        return
    cases = args.cases.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    passed = [str(a) for a in ("--samples", args.samples, "--batch", args.batch, "--steps", args.steps,
                               "--longest", args.longest, "--memory-tokens", args.memory_tokens, "--work", args.work)]
    passed += ["--tiny"] if args.tiny else []
    for _ in range(args.rounds):
        for case in cases:
            cmd = [sys.executable, __file__, *passed, "--case", case]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
            if done.returncode:
                raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
            runs[case].append(json.loads((args.work / f"{case}.json").read_text()))
    med = {c: {k: statistics.median(r[k] for r in rs) if rs[0].get(k) is not None else None for k in rs[0]} for c, rs in runs.items()}
    shape = "tiny" if args.tiny else "hidden 256, 4 layers, vocabulary 151,936"
    print(f"Qwen2.5-VL shape ({shape}), fp32, full fine-tuning on the CPU; medians of {args.rounds} rounds")
    for case, m in med.items():
        rate = f"{m['tokens_per_s']:8.0f} real tokens/s" if m["tokens_per_s"] else " " * 21
        pad = f"padding {100 * m['padding']:5.1f}%" if m["padding"] is not None else " " * 13
        print(f"  {case:<14} {rate}   {pad}   peak RSS {m['peak_rss'] / 2**20:7.0f} MiB")
    ratios = {}
    if {"packed", "padded"} <= med.keys():
        ratios["packed/padded tokens/s"] = med["packed"]["tokens_per_s"] / med["padded"]["tokens_per_s"]
    if {"packed", "trl"} <= med.keys():
        ratios["packed/trl tokens/s"] = med["packed"]["tokens_per_s"] / med["trl"]["tokens_per_s"]
    if "padded-logits" in med and "packed" in med:
        ratios["packed/padded-logits tokens/s"] = med["packed"]["tokens_per_s"] / med["padded-logits"]["tokens_per_s"]
    if "mem-surgeon" in med:
        ratios["mem-surgeon plan/peak RSS"] = med["mem-surgeon"]["plan"] / med["mem-surgeon"]["peak_rss"]
    if set(MEMORY) <= med.keys():
        ratios["surgeon/plain peak RSS"] = med["mem-surgeon"]["peak_rss"] / med["mem-plain"]["peak_rss"]
        ratios["surgeon/trl peak RSS"] = med["mem-surgeon"]["peak_rss"] / med["mem-trl"]["peak_rss"]
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}×")
    (args.work / "train-lengths.json").write_text(json.dumps({"medians": med, "ratios": ratios, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
