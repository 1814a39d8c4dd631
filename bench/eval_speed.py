"""``surgeon eval``'s generation against a plain transformers ``generate`` loop over the same batches,
on the CPU, alternating the two in every round (a benchmark, not a test).

    python bench/eval_speed.py                    # the 23M shape of gpu_train.py, 48 text items, batches of 8
    python bench/eval_speed.py --tiny --rounds 1  # seconds: checks the script runs

Both sides get the same items in the same batches, left-padded, greedy, the same maximum length and
stop tokens (and must give the same completions, checked in an untimed first round): surgeon's ``Generator`` (prompts rendered with the chat template, images opened,
completions cut at the stop token and decoded) and a loop that renders the same prompts, calls
the processor and ``model.generate``, and decodes. Reported: items per second of each (median of
the rounds) and surgeon / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    import torch

    from gpu_train import SHAPE_23M, SHAPE_TINY
    from surgeon.data.encoding import SampleEncoder
    from surgeon.demo import tiny
    from surgeon.evaluation.generate import Generator, read_items
    from surgeon.modules.folders import load_eval_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "eval")
    args = parser.parse_args()
    work = args.work / ("tiny" if args.tiny else "23m")
    work.mkdir(parents=True, exist_ok=True)
    vlm = work / "vlm"
    if not (vlm / "config.json").exists():
        tiny.build("qwen2_5_vl", vlm, dtype=torch.float32, **(SHAPE_TINY if args.tiny else SHAPE_23M))
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {2 * i}? Think step by step."}], "answer": 3 * i} for i in range(args.items)]
    (work / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, _ = read_items(f"sums={work / 'items.jsonl'}")
    torch.set_num_threads(torch.get_num_threads())
    model = load_eval_model(vlm, "cpu")
    encoder = SampleEncoder.from_pretrained(vlm)
    stops, tokenizer = encoder.stop_token_ids(), encoder.tokenizer

    def ours() -> list[str]:
        return [c.generated for c in Generator(model, encoder, args.new_tokens, args.batch)(items)]

    def plain() -> list[str]:
        tokenizer.padding_side = "left"
        out = []
        for b in range(0, len(items), args.batch):
            prompts = [encoder.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": i.prompt[-1].text}]}],
                                                             tokenize=False, add_generation_prompt=True) for i in items[b : b + args.batch]]  # fmt: skip
            batch = encoder.processor(text=prompts, padding=True, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    assert ours() == plain(), "the two sides must give the same completions"  # (and a warm-up of each, not timed)
    times: dict[str, list[float]] = {"surgeon": [], "plain": []}
    for _ in range(args.rounds):
        for name, fn in (("surgeon", ours), ("plain", plain)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {k: len(items) / statistics.median(v) for k, v in times.items()}
    print(f"{'tiny' if args.tiny else '23M'} Qwen2.5-VL shape, {len(items)} items in batches of {args.batch}, {args.new_tokens} new tokens; "
          f"medians of {args.rounds} rounds")  # fmt: skip
    for name, value in rate.items():
        print(f"  {name:<8} {value:7.2f} items/s   seconds per round {[round(t, 2) for t in times[name]]}")
    print(f"  surgeon / plain: {rate['surgeon'] / rate['plain']:.2f}×")


if __name__ == "__main__":
    main()
