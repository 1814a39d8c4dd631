"""The language model's attention backend (``--attn``), and packed rows on the model side: each
sample's positions start again at 0 and each sample attends only to itself.

    check_attn("sdpa", device)                     # one line when the backend cannot run here
    check_packable(config_json)                    # one line naming a model type that cannot pack
    packer = Packer(model, "sdpa")                 # the LM's attention set; None-safe outside packed rows
    with packer.row(batch) as inputs:              # positions built; kept through forward *and* backward
        losses = …(model(**inputs)); backward

Attention per sample costs what the samples cost, Σ Lᵢ², never the row's length squared: with
``sdpa`` or ``eager`` surgeon's own backend runs causal attention on each sample's slice of the
query, key and value (a process-wide segment list, so that activation checkpointing's
recomputation in backward sees it too), with no [row × row] mask; with ``flash_attention_2`` or
``flex_attention`` transformers' own varlen paths see the restarting positions and no mask.

Positions: 1-D RoPE families restart ``position_ids`` per sample; Qwen2-VL, Qwen2.5-VL and
Qwen3-VL get the 3-D M-RoPE positions of each sample computed on its own (the model's
``get_rope_index`` on that sample's tokens and image grids) and concatenated, with the text
positions in front as transformers reads packed M-RoPE inputs ([4, 1, T]).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from surgeon.errors import ConfigError

ATTENTIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
PACKED = "surgeon_packed"
# model type -> how its positions are built. Families left out attend across tokens in ways that
# per-sample causal attention would change (Gemma 3's bidirectional image attention, mllama's
# cross-attention, LFM2's short convolutions, Phi-4-multimodal's LoRA-switched towers …).
PACKABLE: dict[str, str] = {
    "qwen2_vl": "mrope", "qwen2_5_vl": "mrope", "qwen3_vl": "mrope", "qwen3_vl_moe": "mrope",
    "llava": "1d", "llava_next": "1d", "llava_onevision": "1d", "idefics3": "1d", "smolvlm": "1d", "internvl": "1d",
    "qwen2": "1d", "qwen3": "1d", "qwen2_moe": "1d", "qwen3_moe": "1d", "llama": "1d", "mistral": "1d",
}  # fmt: skip

_SEGMENTS: list[tuple[int, int]] | None = None  # the row being computed (set by ``Packer.row``)
_OURS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()  # LM attention module -> the backend it runs per sample


def check_attn(attn: str, device_type: str, training: bool = True) -> None:
    """ConfigError when ``attn`` is unknown or cannot run here (its package missing, no GPU for
    flash-attn, flex_attention's missing backward on the CPU)."""
    if attn not in ATTENTIONS:
        raise ConfigError("attn", f"unknown attention backend {attn!r}", f"choose one of {', '.join(ATTENTIONS)}")
    if attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attn", "flash_attention_2 needs the flash-attn package", "pip install flash-attn (on a CUDA GPU), or use --attn sdpa")
        if device_type != "cuda":
            raise ConfigError("attn", "flash_attention_2 runs on CUDA GPUs only", "use --attn sdpa on this machine")
    if attn == "flex_attention":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            raise ConfigError("attn", "flex_attention needs torch >= 2.5", "upgrade torch, or use --attn sdpa")
        if device_type != "cuda" and training:
            raise ConfigError("attn", "flex_attention has no backward pass on the CPU in this torch", "use --attn sdpa on the CPU")


def check_packable(model_config: dict, source: str = "model") -> str:
    """How positions are built for this model type (``mrope`` or ``1d``); ConfigError naming the
    model type when surgeon cannot pack it without letting samples attend to each other."""
    model_type = str(model_config.get("model_type") or "")
    kind = PACKABLE.get(model_type)
    if kind is None:
        raise ConfigError(
            "packing", f"{source} is a {model_type or 'model of unknown type'}, which surgeon cannot pack without cross-sample attention",
            f"train it without --packing (packable: {', '.join(sorted(PACKABLE))})",
        )  # fmt: skip
    return kind


def set_attention(model: Any, attn: str, packing: bool) -> None:
    """Run the language model's attention with ``attn``; for packed rows with ``sdpa``/``eager``
    through surgeon's per-sample backend (the vision tower keeps its own)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from surgeon.anatomy.decoder import language_model

    name = attn
    if packing and attn in ("sdpa", "eager"):
        AttentionInterface.register(PACKED, _packed_attention)
        AttentionMaskInterface.register(PACKED, lambda *args, **kwargs: None)  # segments, not a mask, keep samples apart
        name = PACKED
        for module in language_model(model).modules():
            if hasattr(module, "num_key_value_groups") or type(module).__name__.endswith("Attention"):
                _OURS[module] = attn
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text_key = next((k for k in ("text_config", "llm_config", "language_config") if getattr(base.config, k, None) is not None), None)
    base.set_attn_implementation({text_key: name} if text_key else name)


class Packer:
    """Packed rows for one model: positions per sample, segments for the attention backend."""

    def __init__(self, model: Any, kind: str) -> None:
        self.kind = kind
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.rope = next((m for m in base.modules() if hasattr(m, "get_rope_index")), None) if kind == "mrope" else None
        if kind == "mrope" and self.rope is None:
            raise ConfigError("packing", f"{type(base).__name__} has no get_rope_index for its 3-D positions", "train it without --packing")

        config = base.config
        self.image_id, self.video_id = (getattr(config, k, None) for k in ("image_token_id", "video_token_id"))

    @contextlib.contextmanager
    def row(self, batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """The model inputs of a packed row (positions added, no attention mask: the segments keep
        samples apart), with the segments set until the block ends."""
        global _SEGMENTS
        lengths = [int(n) for n in batch.pop("packed_lengths")]
        images, videos = batch.pop("packed_images"), batch.pop("packed_videos")
        if videos.any():
            raise ConfigError("packing", "packed rows do not hold videos", "train videos without --packing")
        inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
        inputs["position_ids"] = self._positions(batch, lengths, images).to(batch["input_ids"].device)
        starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        _SEGMENTS = list(zip(starts[:-1], starts[1:]))
        try:
            yield inputs
        finally:
            _SEGMENTS = None

    def _positions(self, batch: dict[str, torch.Tensor], lengths: list[int], images: torch.Tensor) -> torch.Tensor:
        text = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)  # [1, T]
        if self.kind == "1d":
            return text
        grids = batch.get("image_grid_thw")
        per_sample = torch.split(grids, images.tolist()) if grids is not None else [None] * len(lengths)
        out, start = [], 0
        for n, grid in zip(lengths, per_sample):
            ids = batch["input_ids"][:, start : start + n]
            types = batch["mm_token_type_ids"][:, start : start + n] if "mm_token_type_ids" in batch else self._token_types(ids)
            rope, _ = self.rope.get_rope_index(  # type: ignore[union-attr]
                ids, image_grid_thw=grid if grid is not None and len(grid) else None, attention_mask=torch.ones_like(ids),
                **({"mm_token_type_ids": types} if "mm_token_type_ids" in inspect.signature(self.rope.get_rope_index).parameters else {}),
            )  # fmt: skip
            out.append(rope.cpu())
            start += n
        return torch.cat([text.unsqueeze(0), torch.cat(out, dim=-1)], dim=0)  # [4, 1, T]


    def _token_types(self, ids: torch.Tensor) -> torch.Tensor:
        """``mm_token_type_ids`` (0 text, 1 image, 2 video) where the processor gave none."""
        types = torch.zeros_like(ids, dtype=torch.int)
        if self.image_id is not None:
            types[ids == self.image_id] = 1
        if self.video_id is not None:
            types[ids == self.video_id] = 2
        return types


def _packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """Causal attention on each sample's slice of the row (query [B, H, T, D]); outside a packed
    row, or for another module, the backend the LM was set to."""
    base = _OURS.get(module, "sdpa")
    if _SEGMENTS is None or module not in _OURS:
        from transformers import AttentionInterface

        return AttentionInterface()[base](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1) or 1
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    window = getattr(module, "sliding_window", None)
    p = dropout if module.training else 0.0
    parts = [_causal(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scaling, p, window, base) for a, b in _SEGMENTS]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, p: float, window: int | None, base: str) -> torch.Tensor:
    """Causal attention of one sample (sliding-window when the layer has one and the sample is longer)."""
    n = q.shape[2]
    mask = None
    if window and n > window:
        i = torch.arange(n, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    if base == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, scale=scale)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
    return F.dropout(weights, p=p, training=p > 0) @ v
