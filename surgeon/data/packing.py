"""Packed rows: the samples of a micro-batch laid end to end in one row, with no padding.

    batch = pack(items, pad_token_id)      # input_ids [1, ΣL], labels, perception_mask, vision tensors …
    batch["packed_lengths"]                # [n] each sample's length, in order (cu_seqlens = 0, cumsum)
    batch["packed_images"], ["packed_videos"]   # [n] images and videos of each sample, in order

Each sample keeps its own tokens and images; what keeps samples apart is the model side
(``surgeon.training.attention``): positions restart at every sample (for Qwen-VL's M-RoPE, the
3-D positions of each sample on its own) and attention is computed per sample. The first token of
every sample is never supervised: it would be predicted from the previous sample's last token.
So a packed row's per-token losses are those of its samples run one by one, and a packed step
computes no position that a padded step would waste on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from surgeon.data.encoding import IGNORE_INDEX, Encoded, collate, concat_vision

PACKING_KEYS = ("packed_lengths", "packed_images", "packed_videos")  # popped before the model is called


def pack(items: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One packed row of ``items`` (see the module docstring); vision tensors are concatenated in
    sample order, as ``collate`` does."""
    if not items:
        raise ValueError("pack needs at least one sample")
    lengths = [len(item) for item in items]
    tokens = collate([Encoded(item.tokens, {}, item.line) for item in items], pad_token_id)  # [n, longest], padding cut below
    tokens["labels"][:, 0] = IGNORE_INDEX  # nothing before a sample's first token in its own sample predicts it
    row = {key: _join(value, lengths) for key, value in tokens.items()}
    row.update(concat_vision(items))
    row["packed_lengths"] = torch.tensor(lengths, dtype=torch.long)
    row["packed_images"] = torch.tensor([_count(e, "image_grid_thw", "pixel_values") for e in items], dtype=torch.long)
    row["packed_videos"] = torch.tensor([_count(e, "video_grid_thw", "pixel_values_videos") for e in items], dtype=torch.long)
    return row


def _join(rows: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The first ``lengths[i]`` entries of each row, end to end, as one row [1, ΣL]."""
    return torch.cat([rows[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)


def _count(item: Encoded, grid: str, pixels: str) -> int:
    """How many images (or videos) a sample holds: rows of its grid (Qwen-VL) or of its pixels (LLaVA)."""
    if grid in item.vision:
        return int(item.vision[grid].shape[0])
    if pixels in item.vision and item.vision[pixels].dim() >= 4:
        return int(item.vision[pixels].shape[0])
    return 0
