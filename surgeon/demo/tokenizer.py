"""The tiny models' tokenizer: a byte-level BPE trained on a few sentences (or any corpus), with
the special tokens and chat template of the Qwen-VL family."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
    "<perception>",
    "</perception>",
]
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|>{{ IMAGE }}<|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The red circle is above the blue square.",
    "Count the shapes: there are three triangles and two circles.",
    "First, look at the chart. The tallest bar is green, so the answer is green.",
    "Let me think step by step. 3 + 4 = 7, then 7 * 2 = 14. Answer: 14",
    "What color is the largest shape? Which shape is on the left? How many bars are there?",
    "The image shows a yellow star next to a purple triangle on a white background.",
    "Therefore the total is 12. The final answer is 12.",
    "user assistant system You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 420, split_digits: bool = False) -> str:
    """A byte-level BPE trained on ``corpus`` with the Qwen-VL special tokens, as JSON text for
    ``tokenizer(tokenizer_json=…)``. ``split_digits`` makes every digit its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level]) if digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    return train_tokenizer(CORPUS * 20)


def tokenizer(image_token: str = "<|image_pad|>", tokenizer_json: str | None = None) -> Any:
    """The tiny Qwen-style tokenizer with the family's chat template (``tokenizer_json``: one
    from ``train_tokenizer`` instead of the built-in one)."""
    from tokenizers import Tokenizer
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(
        tokenizer_object=Tokenizer.from_str(tokenizer_json or _tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": image_token} if image_token else {},
    )
    tok.chat_template = QWEN_VL_TEMPLATE.replace("{{ IMAGE }}", image_token)
    return tok
