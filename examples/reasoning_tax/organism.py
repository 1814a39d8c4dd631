"""The model organism: synthetic tasks, a tokenizer trained on them, and the three models the study
starts from (a pretrained base LM, a "reasoning LLM" and a "VLM"), built from scratch on a CPU.

Tasks
- text reasoning: word problems with a chain of thought, one arithmetic step per clause,
      "Ann has 3 pens, gets 4 more, gives away 2 and gets 5 more. How many pens now?"
      -> "3 + 4 = 7. 7 - 2 = 5. 5 + 5 = 10. Answer: 10"
- perception: a 4×2 grid of coloured tiles (each tile is one visual token of the VLM),
      "How many red tiles are there?" -> "There are 3 red tiles."
- visual reasoning (the SFT task): a word problem whose first number is read off the image,
      "How many red tiles are there? Ann has one of the pens for each, gets 4 more. How many pens now?"
      -> "<perception>There are 3 red tiles.</perception> 3 + 4 = 7. Answer: 7"

Models (every stage is ordinary next-token training of the answer tokens, with AdamW):
- base: a Qwen2 text LM pretrained on text problems of 1 to 3 steps (mostly short ones);
- reasoning LLM: the base trained further on 3- and 4-step problems;
- VLM: a Qwen2.5-VL whose language model starts as the base, with a new vision tower, trained on
  perception questions mixed with the base's text problems.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from surgeon.data.encoding import SampleEncoder, collate
from surgeon.data.formats import parse_record
from surgeon.demo import tiny
from surgeon.demo.tokenizer import tokenizer, train_tokenizer
from surgeon.demo.synthetic import COLOURS as PALETTE

NAMES = ("Ann", "Bob", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal")
ITEMS = ("apples", "pens", "cards", "coins", "books", "cups")
COLOURS = {c: PALETTE[c] for c in ("red", "green", "blue", "yellow")}
TILE, COLS, ROWS = 28, 4, 2  # one tile = one merged 28×28 patch = one visual token


@dataclass(frozen=True)
class Size:
    """The organism's size and training budget (``quick`` is a smoke-test size, not a result)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    base_steps: int = 700
    reasoning_steps: int = 500
    vlm_steps: int = 600
    batch: int = 32
    vocab: int = 384


SIZES = {
    "smoke": Size(hidden=32, layers=2, heads=2, kv_heads=1, base_steps=4, reasoning_steps=2, vlm_steps=4, batch=4),  # for tests only
    "quick": Size(hidden=64, base_steps=60, reasoning_steps=20, vlm_steps=40, batch=16),
    "quick-deep": Size(hidden=64, layers=8, base_steps=60, reasoning_steps=20, vlm_steps=40, batch=16),
    "small": Size(),
    "deep": Size(layers=8),
    "gpu": Size(hidden=512, layers=8, heads=8, kv_heads=4, base_steps=4000, reasoning_steps=1500, vlm_steps=2500, batch=64),
    "gpu-deep": Size(hidden=512, layers=16, heads=8, kv_heads=4, base_steps=4000, reasoning_steps=1500, vlm_steps=2500, batch=64),
}


# ------------------------------------------------------------------ tasks


def _steps(rng: random.Random, start: int, k: int) -> tuple[list[str], list[str], int]:
    """k clauses and their chain-of-thought lines, the total staying in 0..40."""
    clauses, lines, total = [], [], start
    for _ in range(k):
        if total > 3 and (total > 30 or rng.random() < 0.5):
            n = rng.randint(1, min(9, total))
            clauses.append(f"gives away {n}")
            lines.append(f"{total} - {n} = {total - n}.")
            total -= n
        else:
            n = rng.randint(1, 9)
            clauses.append(f"gets {n} more")
            lines.append(f"{total} + {n} = {total + n}.")
            total += n
    return clauses, lines, total


def _join(clauses: list[str]) -> str:
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def text_problem(rng: random.Random, k: int) -> dict:
    name, item, start = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, 9)
    clauses, lines, total = _steps(rng, start, k)
    question = f"{name} has {start} {item}, {_join(clauses)}. How many {item} now?"
    answer = " ".join(lines) + f" Answer: {total}"
    return {"messages": [_user(question), _assistant(answer)], "answer": str(total), "kind": f"text{k}"}


def tiles(rng: random.Random, colour: str, count: int) -> Image.Image:
    """A 4×2 grid with ``count`` tiles of ``colour``; each other tile is white (3 in 4) or of
    another colour."""
    others = [c for c in COLOURS if c != colour]
    cells = [colour] * count + [
        rng.choice(others) if rng.random() < 0.25 else "white" for _ in range(COLS * ROWS - count)
    ]
    rng.shuffle(cells)
    image = Image.new("RGB", (COLS * TILE, ROWS * TILE), "white")
    draw = ImageDraw.Draw(image)
    for i, cell in enumerate(cells):
        if cell != "white":
            x, y = (i % COLS) * TILE, (i // COLS) * TILE
            draw.rectangle((x + 2, y + 2, x + TILE - 3, y + TILE - 3), fill=COLOURS[cell])
    return image


def perception_sample(rng: random.Random, image_path: str) -> tuple[dict, Image.Image]:
    colour, count = rng.choice(list(COLOURS)), rng.randint(1, 4)
    record = {
        "messages": [
            _user(f"How many {colour} tiles are there?", image_path),
            _assistant(f"There are {count} {colour} tiles."),
        ],
        "answer": str(count),
        "colour": colour,
        "kind": "perception",
    }
    return record, tiles(rng, colour, count)


def visual_problem(rng: random.Random, image_path: str, k: int, colours: tuple[str, ...] = tuple(COLOURS)) -> tuple[dict, Image.Image]:
    """Perception (a tile colour among ``colours``), then k reasoning steps; the answer tags the
    perception span."""
    colour, count = rng.choice(list(colours)), rng.randint(1, 4)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    clauses, lines, total = _steps(rng, count, k)
    question = f"How many {colour} tiles are there? {name} has one of the {item} for each, {_join(clauses)}. How many {item} now?"
    seen = f"There are {count} {colour} tiles."
    answer = f"<perception>{seen}</perception> " + " ".join(lines) + f" Answer: {total}"
    record = {
        "messages": [_user(question, image_path), _assistant(answer)],
        "answer": str(total),
        "count": str(count),
        "colour": colour,
        "perception_reference": seen,
        "kind": f"visual{k}",
    }
    return record, tiles(rng, colour, count)


def _user(text: str, image: str | None = None) -> dict:
    parts = [{"type": "image", "image": image}] if image else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_visual_set(folder: Path, name: str, n: int, seed: int, make: Any) -> Path:
    """n records from ``make(rng, image_path)`` with their PNGs, as ``folder/name.jsonl``."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rel = f"images/{name}-{i:05d}.png"
        record, image = make(rng, rel)
        image.save(folder / rel)
        records.append(record)
    return write_jsonl(folder / f"{name}.jsonl", records)


def text_set(n: int, seed: int, depths: dict[int, float]) -> list[dict]:
    rng = random.Random(seed)
    ks, weights = list(depths), list(depths.values())
    return [text_problem(rng, rng.choices(ks, weights)[0]) for _ in range(n)]


# ------------------------------------------------------------------ models


def tokenizer_json(size: Size) -> str:
    rng = random.Random(12345)
    corpus = [text_problem(rng, rng.randint(1, 4))["messages"] for _ in range(1500)]
    corpus += [visual_problem(rng, "x", rng.randint(1, 2))[0]["messages"] for _ in range(500)]
    corpus += [perception_sample(rng, "x")[0]["messages"] for _ in range(200)]
    texts = [p["text"] for msgs in corpus for m in msgs for p in m["content"] if p["type"] == "text"]
    texts += ["user assistant system You are a helpful assistant."] * 20
    return train_tokenizer(texts, vocab_size=size.vocab, split_digits=True)


def text_config(size: Size, vocab: int) -> dict:
    return dict(
        hidden_size=size.hidden,
        intermediate_size=3 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        vocab_size=vocab,
        max_position_embeddings=512,
        rope_theta=10000.0,  # the same in the text LLMs and the VLM (defaults differ)
        rms_norm_eps=1e-6,
    )


def fit(
    model: Any,
    encoder: SampleEncoder,
    records: list[dict],
    *,
    steps: int,
    lr: dict[str, float],
    seed: int,
    label: str,
    base: Path,
    batch: int,
    device: str,
    log: Any = print,
) -> None:
    """AdamW on the answer tokens, cosine schedule with 5 % warm-up; ``lr`` maps a parameter-name
    prefix ('' for the rest) to its peak learning rate."""
    encoded = [encoder.encode(parse_record(r, base)) for r in records]
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        prefix = max((k for k in lr if name.startswith(k)), key=len)
        if lr[prefix] > 0:
            groups.setdefault(lr[prefix], []).append(p)
        else:
            p.requires_grad_(False)
    opt = torch.optim.AdamW([{"params": ps, "lr": rate} for rate, ps in groups.items()], weight_decay=0.01)
    peaks = [g["lr"] for g in opt.param_groups]
    warm = max(1, steps // 20)
    rng = random.Random(seed)
    model.to(device).train()
    t0 = time.time()
    for step in range(steps):
        scale = (
            (step + 1) / warm
            if step < warm
            else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        )
        for g, peak in zip(opt.param_groups, peaks):
            g["lr"] = peak * scale
        items = [encoded[rng.randrange(len(encoded))] for _ in range(batch)]
        inputs = collate(items, encoder.pad_token_id)
        inputs.pop("perception_mask")
        loss = model(**{k: v.to(device) for k, v in inputs.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"  {label} step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    model.eval().to("cpu")
    for p in model.parameters():
        p.requires_grad_(True)


def build(work: Path, size: Size, device: str = "cpu", log: Any = print) -> dict[str, Path]:
    """Write data/ and the three starting models under ``work``; returns their folders."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    data = work / "data"
    tok_json = tokenizer_json(size)
    vocab = len(tokenizer(tokenizer_json=tok_json))
    text = text_config(size, -(-vocab // 64) * 64)
    n = size.batch * max(size.base_steps, size.vlm_steps) // 4
    stage = functools.partial(fit, base=data, batch=size.batch, device=device, log=log)

    base = work / "base"
    tiny.build("qwen2", base, seed=0, tokenizer_json=tok_json, **text)
    model = Qwen2ForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    pretrain = text_set(n, 1, {1: 0.45, 2: 0.45, 3: 0.1})
    stage(model, SampleEncoder(tok), pretrain, steps=size.base_steps, lr={"": 3e-3}, seed=1, label="base")
    model.save_pretrained(base)

    reasoning = work / "reasoning-llm"
    tok.save_pretrained(reasoning)
    chains = text_set(n, 2, {2: 0.2, 3: 0.5, 4: 0.3})
    stage(
        model,
        SampleEncoder(tok),
        chains,
        steps=size.reasoning_steps,
        lr={"": 1e-3},
        seed=2,
        label="reasoning",
    )
    model.save_pretrained(reasoning)

    vlm = work / "vlm"
    tiny.build("qwen2_5_vl", vlm, seed=0, tokenizer_json=tok_json, **text)
    model = AutoModelForImageTextToText.from_pretrained(vlm)
    lm = Qwen2ForCausalLM.from_pretrained(base)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    probe = torch.arange(1, 33)[None]
    if not torch.allclose(model(input_ids=probe).logits, lm(input_ids=probe).logits, atol=1e-5):
        raise RuntimeError("the VLM's language model does not compute what the base computes on text")
    perception = write_visual_set(data, "vlm-perception", n // 2, 3, perception_sample)
    records = [json.loads(line) for line in perception.read_text().splitlines()]
    records += text_set(len(records), 4, {1: 0.45, 2: 0.45, 3: 0.1})
    lrs = {"": 2e-4, "model.visual": 3e-3}
    processor = AutoProcessor.from_pretrained(vlm)
    stage(model, SampleEncoder(processor), records, steps=size.vlm_steps, lr=lrs, seed=3, label="vlm")
    model.save_pretrained(vlm)
    return {"base": base, "reasoning": reasoning, "vlm": vlm}
