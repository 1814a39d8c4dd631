"""A model's config.json checked before anything is built from it: sizes within sane limits, and
sizes that agree with the weights stored beside it.

    check_config(config, "my-vlm")                       # sizes, at any depth of the config
    check_weights(config, ckpt.tensors, layout, "my-vlm") # embeddings and decoder layers vs config
    check_checkpoint(ckpt)                               # both, for an opened checkpoint

A config is what a memory plan, a meta-device model or an injection is built from: a damaged
value (``num_hidden_layers: 1000000000``, ``num_attention_heads: 0``) would otherwise allocate
without bound or divide by zero deep inside a library. The limits are far beyond any released
model (the largest today: 128 layers, hidden size 18,432, a 256k vocabulary). Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from surgeon.anatomy.layout import Layout, config_value, detect_layout, text_config
from surgeon.errors import CheckpointError

# key -> (the least value, the most value) for integer sizes anywhere in a config
LIMITS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 1024), "n_layer": (1, 1024), "num_layers": (1, 1024), "depth": (1, 1024),
    "hidden_size": (1, 1 << 17), "n_embd": (1, 1 << 17), "d_model": (1, 1 << 17), "embed_dim": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20), "moe_intermediate_size": (1, 1 << 20),
    "num_attention_heads": (1, 4096), "n_head": (1, 4096), "num_heads": (1, 4096), "num_key_value_heads": (1, 4096),
    "head_dim": (1, 8192), "vocab_size": (1, 1 << 23),
    "num_experts": (0, 1 << 16), "n_routed_experts": (0, 1 << 16), "num_local_experts": (0, 1 << 16),
    "patch_size": (1, 4096), "image_size": (1, 1 << 16), "spatial_merge_size": (1, 64), "temporal_patch_size": (1, 64),
}  # fmt: skip
_NESTED_CAP = 8  # config dicts deeper than this are not configs
_HINT = "config.json looks damaged: restore the one the model was saved with"


def check_config(config: dict, source: str) -> None:
    """CheckpointError naming the first size of ``config`` (at any depth: text, vision, audio
    sub-configs) that is not an integer within ``LIMITS``, or attention sizes that cannot agree
    (heads that do not divide the hidden size without a ``head_dim``, KV heads that do not divide
    the heads)."""
    for where, key, value in _sizes(config):
        least, most = LIMITS[key]
        if isinstance(value, list):
            bad = [v for v in value if not _int(v) or not least <= v <= most]
            if bad or not value:
                raise CheckpointError(source, f"config.json has {where} = {value}, not a list of sizes from {least} to {most:,}", _HINT)
        elif not _int(value) or not least <= value <= most:
            limit = f"at least {least}" if _int(value) and value < least else f"at most {most:,}"
            raise CheckpointError(source, f"config.json has {where} = {value!r}; it must be an integer, {limit}", _HINT)
    for cfg, prefix in _configs(config):
        heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
        hidden = cfg.get("hidden_size")
        if _int(heads) and _int(kv) and heads % kv:
            raise CheckpointError(source, f"config.json has {prefix}num_key_value_heads = {kv}, which does not divide num_attention_heads = {heads}", _HINT)
        if _int(heads) and _int(hidden) and cfg.get("head_dim") is None and hidden % heads:
            raise CheckpointError(source, f"config.json has {prefix}hidden_size = {hidden}, which num_attention_heads = {heads} does not divide (and no head_dim)", _HINT)


def check_weights(config: dict, tensors: dict[str, Any], layout: Layout, source: str) -> None:
    """CheckpointError when the language model's stored weights disagree with ``config``: the token
    embeddings' width and the first decoder layer's projections against the config's sizes (what
    transformers would refuse to load, said in one line before any weight is read). The
    embeddings' rows are not held to ``vocab_size``: some families store extra rows (mllama: 8)."""
    text = text_config(config)
    embed = tensors.get(layout.lm_prefix + "embed_tokens.weight")
    hidden = config_value(config, "hidden_size", "n_embd", "d_model")
    if embed is not None and len(embed.shape) == 2 and _int(hidden) and embed.shape[1] != hidden:
        raise CheckpointError(source, f"its token embeddings are {embed.shape[1]} wide but config.json says hidden_size = {hidden}", _MISMATCH)
    heads = text.get("num_attention_heads")
    kv = text.get("num_key_value_heads") or heads
    if not (_int(hidden) and _int(heads) and _int(kv)):
        return
    head_dim = text.get("head_dim") or hidden // heads
    first = f"{layout.lm_prefix}{layout.layer_word}.0.self_attn."
    for proj, count in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
        info = tensors.get(first + proj + ".weight")
        if info is not None and len(info.shape) == 2 and info.shape[0] not in (count * head_dim, 2 * count * head_dim):
            raise CheckpointError(
                source, f"its {proj} has {info.shape[0]} output features, but config.json's heads give {count} × {head_dim}", _MISMATCH
            )


def check_checkpoint(ckpt: Any) -> None:
    """``check_config`` and ``check_weights`` for an open ``surgeon.io.checkpoint.Checkpoint``."""
    if not ckpt.config:
        return
    check_config(ckpt.config, ckpt.source)
    check_weights(ckpt.config, ckpt.tensors, detect_layout(list(ckpt.tensors), ckpt.config, ckpt.source), ckpt.source)


_MISMATCH = "config.json does not belong to these weights: restore the config the model was saved with"


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _configs(config: dict, prefix: str = "", depth: int = 0) -> Iterator[tuple[dict, str]]:
    yield config, prefix
    if depth < _NESTED_CAP:
        for key, value in config.items():
            if isinstance(value, dict) and key not in ("quantization_config", "rope_scaling", "rope_parameters", "auto_map", "surgeon"):
                yield from _configs(value, f"{prefix}{key}.", depth + 1)


def _sizes(config: dict) -> Iterator[tuple[str, str, Any]]:
    for cfg, prefix in _configs(config):
        for key in LIMITS:
            if key in cfg and cfg[key] is not None:
                yield prefix + key, key, cfg[key]
