"""A small synthetic VLM dataset: rendered shapes and bar charts, questions, tagged chain-of-thought.

Every answer starts with what the image shows, tagged ``<perception>…</perception>``, then reasons
to a final ``Answer: X``. The mix (cycled through first, then drawn at random) is:

===========  ======  ==================================================================
kind         images  question
===========  ======  ==================================================================
shapes       1       colour / kind / position of one of two shapes
count        1       how many shapes of one kind
chart        1       tallest bar or total of a bar chart
multi        2       how many shapes in the two images together
text         0       arithmetic, no image and no perception span (with a system turn)
multiturn    1       two question/answer rounds about one image
===========  ======  ==================================================================

Each JSONL line also carries ``answer`` (the final answer of the last turn),
``perception_reference`` (what the image shows, untagged; empty for text-only samples) and
``kind``. Images are small PNGs (56 to 112 pixels a side) under ``images/``, referenced by paths
relative to the JSONL file. Formats (``fmt``):

- ``trl``: ``messages`` with content parts ``{"type": "image", "image": "images/…png"}`` and
  ``{"type": "text", "text": …}`` (TRL's conversational vision format, paths inline).
- ``sharegpt``: ``conversations`` of ``{"from": "human"|"gpt", "value": …}`` with ``<image>``
  placeholders in the text and an ``images`` list (LLaVA / ShareGPT).
- ``llamafactory``: ``messages`` of ``{"role": …, "content": str}`` with ``<image>``
  placeholders and an ``images`` list (LLaMA-Factory's multimodal format).

The same ``n`` and ``seed`` give the same images and texts in every format. Used by the tests,
``surgeon demo`` and the benchmarks; from the shell:

    python examples/make_dataset.py OUT_DIR [--n 48] [--seed 0] [--fmt trl|sharegpt|llamafactory]
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

FORMATS = ("trl", "sharegpt", "llamafactory")
KINDS = ("shapes", "count", "chart", "multi", "text", "multiturn")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = (56, 84, 112)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def make_dataset(out_dir: str | Path, n: int = 48, seed: int = 0, fmt: str = "trl") -> Path:
    """Write ``n`` samples (images + ``data.jsonl``) into ``out_dir``; returns the JSONL path."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = KINDS[i] if i < len(KINDS) else rng.choice(KINDS)
        turns, images, meta = BUILDERS[kind](rng)
        paths = []
        for j, image in enumerate(images):
            rel = f"images/{i:05d}_{j}.png"
            image.save(out / rel)
            paths.append(rel)
        lines.append(json.dumps({**_format(turns, paths, fmt), **meta, "kind": kind}))
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ drawing


def _canvas(rng: random.Random) -> Image.Image:
    return Image.new("RGB", (rng.choice(SIZES), rng.choice(SIZES)), (255, 255, 255))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _cells(image: Image.Image, count: int) -> list[tuple[int, int, int, int]]:
    """``count`` non-overlapping square boxes in a row (two rows for more than 3)."""
    w, h = image.size
    cols = min(count, 3)
    rows = (count + cols - 1) // cols
    cw, ch = w // cols, h // rows
    side = min(cw, ch) * 3 // 4  # square boxes, centred in their cells
    boxes = []
    for r in range(rows):
        for c in range(cols):
            x, y = c * cw + (cw - side) // 2, r * ch + (ch - side) // 2
            boxes.append((x, y, x + side, y + side))
    return boxes[:count]


def _objects(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` distinct (colour, shape) pairs."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return rng.sample(pairs, count)


def _scene(rng: random.Random, count: int) -> tuple[Image.Image, list[tuple[str, str]]]:
    image = _canvas(rng)
    objects = _objects(rng, count)
    draw = ImageDraw.Draw(image)
    for (colour, shape), box in zip(objects, _cells(image, count)):
        _draw_shape(draw, shape, colour, box)
    return image, objects


def _listing(objects: list[tuple[str, str]]) -> str:
    names = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ------------------------------------------------------------------ sample kinds
# Each returns (turns, images, meta); a turn is (role, text) with "<image>" marking where images go.


def _answer(perception: str | None, reasoning: str) -> str:
    return f"<perception>{perception}</perception> {reasoning}" if perception else reasoning


def _shapes(rng: random.Random) -> tuple[list, list, dict]:
    image = _canvas(rng)
    (c1, s1), (c2, s2) = _objects(rng, 2)
    draw = ImageDraw.Draw(image)
    for (colour, shape), box in zip(((c1, s1), (c2, s2)), _cells(image, 2)):
        _draw_shape(draw, shape, colour, box)
    seen = f"The image shows {_listing([(c1, s1)])} on the left and {_listing([(c2, s2)])} on the right."
    q = rng.randrange(3)
    if q == 0:
        question, answer = f"What colour is the {s2} on the right?", c2
        reasoning = (
            f"The question asks about the shape on the right, which is the {s2}, "
            f"and it is {c2}, so the answer is {c2}."
        )
    elif q == 1:
        question, answer = "Which kind of shape is on the left?", s1
        reasoning = f"The shape on the left is the {c1} one, and it is a {s1}, so the answer is {s1}."
    elif rng.random() < 0.5:
        question, answer = f"Is the {c1} {s1} to the left of the {c2} {s2}?", "yes"
        reasoning = f"The {c1} {s1} is on the left and the {c2} {s2} on the right, so the answer is yes."
    else:
        question, answer = f"Is the {c2} {s2} to the left of the {c1} {s1}?", "no"
        reasoning = f"The {c2} {s2} is on the right of the {c1} {s1}, not on its left, so the answer is no."
    turns = [("user", f"<image>{question}"), ("assistant", _answer(seen, f"{reasoning} Answer: {answer}"))]
    return turns, [image], {"answer": answer, "perception_reference": seen}


def _count(rng: random.Random) -> tuple[list, list, dict]:
    count = rng.randint(2, 5)
    image = _canvas(rng)
    kinds = [rng.choice(SHAPES) for _ in range(count)]
    colours = [rng.choice(list(COLOURS)) for _ in range(count)]
    draw = ImageDraw.Draw(image)
    for shape, colour, box in zip(kinds, colours, _cells(image, count)):
        _draw_shape(draw, shape, colour, box)
    target = rng.choice(kinds)
    tally = {s: kinds.count(s) for s in SHAPES if s in kinds}
    parts = [f"{k} {s}{'s' if k > 1 else ''}" for s, k in tally.items()]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    seen = f"The image shows {listing}."
    k = tally[target]
    reasoning = f"Counting only the {target}s gives {NUMBER_WORDS[k]}, so the answer is {k}. Answer: {k}"
    question = f"<image>How many {target}s are in the image?"
    turns = [("user", question), ("assistant", _answer(seen, reasoning))]
    return turns, [image], {"answer": str(k), "perception_reference": seen}


def _chart(rng: random.Random) -> tuple[list, list, dict]:
    bars = rng.randint(3, 4)
    colours = rng.sample(list(COLOURS), bars)
    values = rng.sample(range(1, 10), bars)
    image = _canvas(rng)
    w, h = image.size
    draw = ImageDraw.Draw(image)
    step = w // bars
    for j, (colour, value) in enumerate(zip(colours, values)):
        top = h - 2 - (h - 6) * value // 9
        draw.rectangle((j * step + 2, top, (j + 1) * step - 3, h - 2), fill=COLOURS[colour])
    listing = ", ".join(f"{c} {v}" for c, v in zip(colours[:-1], values[:-1]))
    listing += f" and {colours[-1]} {values[-1]}"
    seen = f"The chart has {NUMBER_WORDS[bars]} bars: {listing}."
    if rng.random() < 0.5:
        best = colours[values.index(max(values))]
        question, answer = "Which colour has the tallest bar?", best
        reasoning = (
            f"The largest value is {max(values)}, which belongs to the {best} bar, "
            f"so the answer is {best}."
        )
    else:
        total = sum(values)
        question, answer = "What is the total of all the bars?", str(total)
        reasoning = (
            f"Adding the bars gives {' + '.join(map(str, values))} = {total}, "
            f"so the answer is {total}."
        )
    turns = [("user", f"<image>{question}"), ("assistant", _answer(seen, f"{reasoning} Answer: {answer}"))]
    return turns, [image], {"answer": answer, "perception_reference": seen}


def _multi(rng: random.Random) -> tuple[list, list, dict]:
    first, a = _scene(rng, rng.randint(1, 3))
    second, b = _scene(rng, rng.randint(1, 3))
    seen = f"The first image shows {_listing(a)}. The second image shows {_listing(b)}."
    total = len(a) + len(b)
    reasoning = f"That is {len(a)} + {len(b)} = {total} shapes, so the answer is {total}. Answer: {total}"
    question = "<image><image>How many shapes are there in the two images together?"
    turns = [("user", question), ("assistant", _answer(seen, reasoning))]
    return turns, [first, second], {"answer": str(total), "perception_reference": seen}


def _text(rng: random.Random) -> tuple[list, list, dict]:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 5)
    total = a + b * c
    reasoning = (
        f"Multiplication comes first: {b} * {c} = {b * c}, "
        f"then {a} + {b * c} = {total}. Answer: {total}"
    )
    turns = [
        ("system", "You are a careful math tutor."),
        ("user", f"What is {a} + {b} * {c}?"),
        ("assistant", reasoning),
    ]
    return turns, [], {"answer": str(total), "perception_reference": ""}


def _multiturn(rng: random.Random) -> tuple[list, list, dict]:
    turns, images, meta = _shapes(rng)
    reasoning = "Both shapes were described above, one on each side, so there are 2 shapes. Answer: 2"
    turns += [("user", "And how many shapes are there?"), ("assistant", reasoning)]
    return turns, images, {**meta, "answer": "2"}


BUILDERS = {
    "shapes": _shapes,
    "count": _count,
    "chart": _chart,
    "multi": _multi,
    "text": _text,
    "multiturn": _multiturn,
}


# ------------------------------------------------------------------ formats


def _format(turns: list[tuple[str, str]], paths: list[str], fmt: str) -> dict:
    if fmt == "sharegpt":
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        record: dict = {"conversations": [{"from": names[r], "value": t} for r, t in turns]}
        return {**record, "images": paths} if paths else record
    if fmt == "llamafactory":
        record = {"messages": [{"role": r, "content": t} for r, t in turns]}
        return {**record, "images": paths} if paths else record
    queue = iter(paths)
    messages = []
    for role, text in turns:
        pieces = text.split("<image>")
        content: list[dict] = []
        for k, piece in enumerate(pieces):
            if k:
                content.append({"type": "image", "image": next(queue)})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return {"messages": messages}

