"""``surgeon inspect``: what a checkpoint is, from config.json and tensor headers alone."""

from __future__ import annotations

from typing import Any

from dataclasses import asdict, dataclass, field

from surgeon.io.checkpoint import Checkpoint
from surgeon.anatomy.layout import Layout, config_value, detect_layout, placeholder_token_ids


@dataclass(frozen=True)
class ModelReport:
    """The facts ``surgeon inspect`` prints. ``params`` splits parameter counts by role."""

    source: str
    architecture: str | None
    model_type: str | None
    kind: str
    num_layers: int
    hidden_size: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    tied_embeddings: bool
    dtype: str
    quantization: str | None
    quantized: dict | None  # the scheme (method, format, scale layouts, bits) and which tensors are and are not quantized
    lm_prefix: str
    lm_head: str | None
    placeholder_tokens: dict[str, int]
    shards: list[dict] = field(default_factory=list)
    params: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layer_word: str = "layers"
    cross_attention_layers: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_checkpoint(ckpt: Checkpoint) -> ModelReport:
    """Describe a checkpoint without reading tensor data (a packed weight's logical shape, 16 bytes,
    when the weights are at hand)."""
    quantized, values, quant_notes = _quantized(ckpt)
    layout = detect_layout(list(values.tensors), ckpt.config, ckpt.source)
    if quantized is not None:
        quantized["not_quantized"] = _not_quantized(values, layout)
    cfg = ckpt.config
    defaults = _text_defaults(cfg)
    embed = ckpt.tensors.get(layout.lm_prefix + "embed_tokens.weight")
    hidden = config_value(cfg, "hidden_size", "n_embd", "d_model", default=defaults.get("hidden_size"))
    if hidden is None and embed is not None and len(embed.shape) == 2:
        hidden = embed.shape[1]
    heads = config_value(cfg, "num_attention_heads", "n_head", default=defaults.get("num_attention_heads"))
    kv = config_value(cfg, "num_key_value_heads", default=defaults.get("num_key_value_heads") or heads)
    head_dim = config_value(cfg, "head_dim", default=(hidden // heads) if hidden and heads else None)
    vocab = config_value(cfg, "vocab_size", default=embed.shape[0] if embed else None)
    return ModelReport(
        source=ckpt.source,
        architecture=(cfg.get("architectures") or [None])[0],
        model_type=cfg.get("model_type"),
        kind=layout.kind,
        num_layers=layout.num_layers,
        hidden_size=hidden,  # type: ignore[arg-type]
        num_attention_heads=heads,  # type: ignore[arg-type]
        num_key_value_heads=kv,  # type: ignore[arg-type]
        head_dim=head_dim,  # type: ignore[arg-type]
        vocab_size=vocab,  # type: ignore[arg-type]
        tied_embeddings=layout.lm_head is None,
        dtype=ckpt.dtype,
        quantization=ckpt.quantization,
        quantized=quantized,
        lm_prefix=layout.lm_prefix,
        lm_head=layout.lm_head,
        placeholder_tokens=placeholder_token_ids(cfg),
        shards=_shards(ckpt),
        params=count_params(values, layout),
        notes=quant_notes + ([] if cfg else ["config.json is missing: the architecture is unknown; layers, parts and sizes come from the tensor names and shapes"]),
        layer_word=layout.layer_word,
        cross_attention_layers=list(layout.cross_layers),
    )


def _quantized(ckpt: Checkpoint) -> tuple[dict | None, Any, list[str]]:
    """The quantization scheme (as a dict), the checkpoint read as its logical tensors, notes."""
    from surgeon.errors import CheckpointError
    from surgeon.io.quantized import Dequantized, quant_scheme

    try:
        scheme = quant_scheme(ckpt)
    except CheckpointError as e:
        return None, ckpt, [f"prior and merge cannot read these weights: {e.problem}"]
    if scheme is None:
        return None, ckpt, []
    return scheme.to_dict(), Dequantized(ckpt, scheme), []


def _not_quantized(values: Any, layout: Any) -> dict[str, int]:
    """Matrices stored unquantized, by part: the head, embeddings, vision tower and projector, router gates, other."""
    out: dict[str, int] = {}
    for name, info in values.tensors.items():
        if name in values.quantized or len(info.shape) != 2:
            continue
        role = layout.role(name)
        part = ("router gates" if name.endswith(("mlp.gate.weight", ".router.weight")) else
                "lm_head" if name == layout.lm_head else "embeddings" if name.endswith("embed_tokens.weight") else
                "vision tower and projector" if role in ("vision", "projector") else "other")  # fmt: skip
        out[part] = out.get(part, 0) + 1
    return out


def _text_defaults(cfg: dict) -> dict:
    """transformers' defaults for the text model's sizes when config.json leaves them out (as
    LLaVA-1.5/1.6 configs do: their ``text_config`` names only what differs from LlamaConfig's
    defaults); empty when nothing is missing or transformers does not know the model type."""
    wanted = ("hidden_size", "num_attention_heads", "num_key_value_heads")
    if all(config_value(cfg, key) is not None for key in wanted[:2]) or not cfg.get("model_type"):
        return {}
    try:
        from transformers import AutoConfig

        text = AutoConfig.for_model(**cfg).get_text_config()
    except Exception:  # noqa: BLE001 - an unknown model type or a config transformers rejects
        return {}
    return {key: getattr(text, key, None) for key in wanted}


def count_params(ckpt: Checkpoint, layout: Layout) -> dict[str, int]:
    """Parameter counts per role, plus the total."""
    counts = {"language_model": 0, "vision": 0, "projector": 0, "other": 0}
    for name, info in ckpt.tensors.items():
        counts[layout.role(name)] += info.numel
    counts["total"] = sum(counts.values())
    return counts


def _shards(ckpt: Checkpoint) -> list[dict]:
    sizes: dict[str, list[int]] = {f: [0, 0] for f in ckpt.files}
    for info in ckpt.tensors.values():
        sizes[info.file][0] += 1
        sizes[info.file][1] += info.nbytes
    return [{"file": f, "tensors": n, "bytes": b} for f, (n, b) in sizes.items()]
