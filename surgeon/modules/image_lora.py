"""Image-LoRA: LoRA on the value projection, at visual tokens only, for selected KV heads only.

    heads = read_heads("heads.json").selected              # from `surgeon score-heads` (surgeon.heads.score)
    add_image_lora(model, heads, ImageLoraConfig(rank=8, alpha=16))   # model.surgeon.image_lora, identity at init
    report = batch_flops(model, batch)                      # adapter FLOPs vs LoRA on v_proj over all tokens
    report.ratio, report.visual_fraction

The maths (docs/methods.md §4) lives in ``surgeon/modules/modeling_surgeon.py`` (``ImageLoraModule``), the file
that saved folders carry, so a trained model loads with ``trust_remote_code=True`` without surgeon
and with ``surgeon.load_model``. Per layer with H_sel ≥ 1 selected heads: A (d×r) shared, B_h
(r×d_h) per head, scalar γ; ΔV[t,h] = (x_t·A·B_h)·(α/r)·γ/√H_sel at visual tokens t. B = 0 at
initialisation, so the model computes exactly what it computed before; text-only inputs are
never changed, trained or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from surgeon.modules import modeling_surgeon as modeling
from surgeon.errors import ConfigError, LayoutError

KIND = "image_lora"
Heads = Sequence[Sequence[int]]  # selected KV heads of every decoder layer


@dataclass(frozen=True)
class ImageLoraConfig:
    """Image-LoRA settings (docs/methods.md §4).

    rank: r (reference default 8). alpha: α (reference default 16); the update is scaled by α/r.
    gamma: initial value of the learnable scalar γ (reference: 0.01).
    seed: seed of A's N(0, 1/r²) init, layer l using seed + l (not specified by the paper;
        surgeon default 0).
    """

    rank: int = 8
    alpha: float = 16.0
    gamma: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError("rank", f"must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError("alpha", f"must be positive, got {self.alpha}")


def selected_heads(heads: Any) -> list[list[int]]:
    """Per-layer head lists from a list of lists or anything with ``.selected`` (``HeadScores``)."""
    heads = getattr(heads, "selected", heads)
    return [[int(h) for h in layer] for layer in heads]


def image_lora_settings(heads: Heads, config: ImageLoraConfig, hidden_size: int, num_kv_heads: int, head_dim: int) -> dict:
    """The ``config.json`` entry ``surgeon.image_lora`` (validated by the modeling file)."""
    settings = {
        "heads": selected_heads(heads), **asdict(config),
        "hidden_size": hidden_size, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
    }  # fmt: skip
    try:
        return modeling.check_image_lora_settings(settings)
    except modeling.SurgeonModelingError as e:
        raise ConfigError("heads", str(e)) from None


def count_parameters(heads: Heads, hidden_size: int, head_dim: int, rank: int) -> int:
    """Σ over layers with H_sel ≥ 1 of d·r + H_sel·r·d_h + 1 (A, the B_h, γ).

    >>> count_parameters([[0]] * 28, 3584, 128, 8)    # Qwen2.5-VL-7B, one head in every layer
    831516
    """
    return sum(hidden_size * rank + len(layer) * rank * head_dim + 1 for layer in heads if layer)


def add_image_lora(model: Any, heads: Any, config: ImageLoraConfig = ImageLoraConfig(), replace: bool = False) -> Any:
    """Attach Image-LoRA adapters (identity at init) for ``heads`` (per-layer KV head lists, or a
    ``HeadScores``) to a loaded transformers model; returns ``model.surgeon.image_lora``. Its
    parameters are fp32 on the device of decoder layer 0."""
    try:
        _, layers = modeling.decoder_of(model)
        hidden, kv, head_dim = modeling.value_dims(model)
    except modeling.SurgeonModelingError as e:
        raise LayoutError(type(model).__name__, str(e)) from None
    container = getattr(model, modeling.MODULE_ATTR, None)
    if isinstance(container, modeling.SurgeonModules) and KIND in container and not replace:
        raise ConfigError("replace", "the model already has Image-LoRA adapters", "pass replace=True to replace them")
    selected = selected_heads(heads)
    if len(selected) != len(layers):
        raise ConfigError(
            "heads",
            f"the selection covers {len(selected)} layers but the model has {len(layers)}",
            "score the heads of this model with surgeon score-heads",
        )
    return modeling.add_module(model, KIND, image_lora_settings(selected, config, hidden, kv, head_dim))


# ------------------------------------------------------------------------------------------ FLOPs
@dataclass(frozen=True)
class FlopsReport:
    """Forward matmul FLOPs (2 per multiply-add) of Image-LoRA against LoRA of the same rank on
    every layer's value projection over all tokens, for ``tokens`` tokens of which
    ``visual_tokens`` are image/video placeholders.

    adapter_flops = 2·T_v·r·Σ_l (d + H_sel,l·d_h)      (x·A once per layer, then one B_h per head)
    lora_flops    = 2·T·r·L·(d + H_kv·d_h)
    ratio         = (T_v/T)·Σ_l (d + H_sel,l·d_h) / (L·(d + H_kv·d_h))   ≈ the visual-token fraction
    The rank cancels in the ratio. Backward costs scale the same way.
    """

    tokens: int
    visual_tokens: int
    rank: int
    adapter_flops: int
    lora_flops: int

    @property
    def visual_fraction(self) -> float:
        return self.visual_tokens / self.tokens if self.tokens else 0.0

    @property
    def ratio(self) -> float:
        return self.adapter_flops / self.lora_flops if self.lora_flops else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "visual_fraction": self.visual_fraction, "ratio": self.ratio}


def flops_report(
    heads: Heads, hidden_size: int, num_kv_heads: int, head_dim: int, tokens: int, visual_tokens: int, rank: int = 8
) -> FlopsReport:
    """The FlopsReport of a head selection for a batch of ``tokens`` tokens, ``visual_tokens`` visual."""
    heads = selected_heads(heads)
    per_token = sum(hidden_size + len(layer) * head_dim for layer in heads if layer)
    lora = len(heads) * (hidden_size + num_kv_heads * head_dim)
    return FlopsReport(tokens, visual_tokens, rank, 2 * visual_tokens * rank * per_token, 2 * tokens * rank * lora)


def batch_flops(model: Any, batch: dict) -> FlopsReport:
    """The FlopsReport of the model's attached Image-LoRA for one batch (``input_ids``; tokens are
    counted where ``attention_mask`` is 1, all positions without one)."""
    import torch

    container = getattr(model, modeling.MODULE_ATTR, None)
    module = container[KIND] if isinstance(container, modeling.SurgeonModules) and KIND in container else None
    if module is None:
        raise ConfigError("model", "has no Image-LoRA adapters", "attach them with add_image_lora")
    s = module.settings
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    visual = torch.isin(ids, torch.tensor(modeling.visual_token_ids(model.config), dtype=ids.dtype)) & real
    return flops_report(
        s["heads"], s["hidden_size"], s["num_kv_heads"], s["head_dim"], int(real.sum()), int(visual.sum()), s["rank"]
    )
