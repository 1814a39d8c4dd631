"""Held-out accuracy by greedy generation: text reasoning, perception, end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ANSWER = re.compile(r"Answer:\s*(-?\d+)")
SEEN = re.compile(r"There are (\d+) (\w+) tiles")


def load(folder: str | Path, device: str = "cpu") -> Any:
    """Any output of the study's commands: a plain, merged, IADA or Image-LoRA model folder."""
    from transformers.utils import logging as hf_logging

    import surgeon

    hf_logging.disable_progress_bar()
    return surgeon.load_model(str(folder)).to(device).eval()


def _final(text: str) -> str | None:
    found = ANSWER.findall(text)
    return found[-1] if found else None


@torch.no_grad()
def generate(
    model: Any, processor: Any, records: list[dict], base: Path, batch: int = 50, max_new: int = 64
) -> list[str]:
    """Greedy completions of each record's first user turn (its images opened from ``base``)."""
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    device = next(model.parameters()).device
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    out: list[str] = []
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        prompts, images = [], []
        for r in chunk:
            user = r["messages"][0]
            content = [{"type": "image"} if p["type"] == "image" else p for p in user["content"]]
            images += [
                Image.open(base / p["image"]).convert("RGB") for p in user["content"] if p["type"] == "image"
            ]
            prompts.append(
                processor.apply_chat_template(
                    [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
                )
            )
        kwargs = {"images": images} if images else {}
        inputs = processor(text=prompts, padding=True, return_tensors="pt", **kwargs).to(device)
        ids = model.generate(
            **inputs,
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=tok.pad_token_id,
        )
        out += tok.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
    return out


def text_accuracy(model: Any, processor: Any, path: Path) -> float:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    texts = generate(model, processor, records, path.parent)
    return sum(_final(t) == r["answer"] for t, r in zip(texts, records)) / len(records)


def visual_accuracy(model: Any, processor: Any, path: Path) -> tuple[float, float]:
    """(perception, end to end): the perception span names the right count and colour; the final
    answer is right."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    texts = generate(model, processor, records, path.parent)
    seen = sum(
        SEEN.search(t) is not None and SEEN.search(t).groups() == (r["count"], r["colour"])
        for t, r in zip(texts, records)
    )
    right = sum(_final(t) == r["answer"] for t, r in zip(texts, records))
    return seen / len(records), right / len(records)
