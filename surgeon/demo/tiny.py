"""Tiny real models, built from transformers configs with no download, for the demo and tests.

    build("qwen2_5_vl", "work/vlm")              # a 4-layer Qwen2.5-VL with its processor
    build("qwen2", "work/llm", seed=1)           # a text LLM whose language model matches it
    build_reasoning_llm("work/vlm", "work/r1")   # the VLM's LM plus a structured "reasoning" delta

Every family shares one language-model shape per text architecture (hidden 64, 4 layers, 4
attention heads, 2 KV heads, vocab 512), so any tiny VLM pairs with the tiny LLM of its text
architecture. The tokenizer (``surgeon.demo.tokenizer``) is a byte-level BPE trained on a few
sentences, with the special tokens and chat template of the Qwen-VL family; LLaVA uses the same
tokenizer with ``<image>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from surgeon.demo.tokenizer import SPECIAL_TOKENS, tokenizer
from surgeon.errors import ConfigError

TEXT: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=2048,
)


def _token_ids(tok: Any) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "image": ids["<|image_pad|>"],
        "video": ids["<|video_pad|>"],
        "vision_start": ids["<|vision_start|>"],
        "vision_end": ids["<|vision_end|>"],
        "llava_image": ids["<image>"],
        "eos": ids["<|im_end|>"],
        "pad": ids["<|endoftext|>"],
    }


def _text(extra: dict | None = None, **kw: Any) -> dict:
    out = dict(TEXT, **kw)
    out.update(extra or {})
    return out


# Each builder returns (model, processor-or-tokenizer). ``t`` is the text-config override dict.
def _qwen2(tok: Any, t: dict) -> tuple[Any, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_text(t, bos_token_id=None, **_eos(tok)))), tok


def _qwen3(tok: Any, t: dict) -> tuple[Any, Any]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_text(t, head_dim=16, **_eos(tok)))), tok


def _llama(tok: Any, t: dict) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_text(t, bos_token_id=None, **_eos(tok)))), tok


def _eos(tok: Any) -> dict:
    ids = _token_ids(tok)
    return {"eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}


def _qwen_vl_processor(tok: Any, cls_name: str, patch: int, video_cls: Callable[..., Any]) -> Any:
    import transformers

    merge = patch * 2
    pixels = dict(min_pixels=merge * merge * 4, max_pixels=merge * merge * 16)
    image_processor = transformers.Qwen2VLImageProcessor(patch_size=patch, **pixels)
    video_processor = video_cls(patch_size=patch, **pixels)
    return getattr(transformers, cls_name)(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=tok.chat_template,
    )


def _mrope(text: dict) -> list[int]:
    """Qwen-VL's multimodal rotary sections (time, height, width) for the text config's head size,
    in the real models' proportions (16, 24, 24 of 64)."""
    half = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) // 2
    first = half // 4
    second = (half - first) // 2
    return [first, second, half - first - second]


def _qwen2_5_vl(tok: Any, t: dict) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    ids = _token_ids(tok)
    text = _text(t)
    cfg = Qwen2_5_VLConfig(
        text_config=_text(t, rope_scaling={"type": "mrope", "mrope_section": _mrope(text)}, bos_token_id=None, **_eos(tok)),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
            fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )  # fmt: skip
    proc = _qwen_vl_processor(tok, "Qwen2_5_VLProcessor", 14, Qwen2VLVideoProcessor)
    return Qwen2_5_VLForConditionalGeneration(cfg), proc


def _qwen3_vl(tok: Any, t: dict) -> tuple[Any, Any]:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    ids = _token_ids(tok)
    cfg = Qwen3VLConfig(
        text_config=_text(
            t, head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            **_eos(tok),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_text(t)["hidden_size"],
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0, 1],
            num_position_embeddings=64,
        ),
        image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )  # fmt: skip
    proc = _qwen_vl_processor(tok, "Qwen3VLProcessor", 16, Qwen3VLVideoProcessor)
    return Qwen3VLForConditionalGeneration(cfg), proc


def _llava(tok: Any, t: dict) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    ids = _token_ids(tok)
    cfg = LlavaConfig(
        text_config=_text(t, model_type="qwen2", bos_token_id=None, **_eos(tok)),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32,
        ),
        image_token_id=ids["llava_image"],
    )  # fmt: skip
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        chat_template=tok.chat_template, num_additional_image_tokens=1,
    )  # fmt: skip
    return LlavaForConditionalGeneration(cfg), proc


def _idefics3(tok: Any, t: dict) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = Idefics3Config(
        text_config=_text(t, model_type="llama", bos_token_id=None, **_eos(tok)),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        image_token_id=_token_ids(tok)["llava_image"],
        scale_factor=2,
    )
    return Idefics3ForConditionalGeneration(cfg), tok


def _vlm_only(
    cls_name: str, cfg_name: str, text: dict, vision: dict, **top: Any
) -> Callable[[Any, dict], tuple[Any, Any]]:
    """A VLM family built for its layout only: saved with the tokenizer, no image processor."""

    def build(tok: Any, t: dict) -> tuple[Any, Any]:
        import transformers

        ids = _token_ids(tok)
        cfg = getattr(transformers, cfg_name)(
            text_config=_text(t, **{"bos_token_id": None, **_eos(tok), **text}),
            vision_config=vision,
            **{k: ids[v] for k, v in top.items()},
        )
        return getattr(transformers, cls_name)(cfg), tok

    return build


_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
_SIGLIP = dict(_CLIP, model_type="siglip_vision_model")
_PINPOINTS = {"image_grid_pinpoints": [[28, 28]]}
LAYOUT_ONLY = {
    "qwen2_vl": _vlm_only(
        "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2),
        image_token_id="image", video_token_id="video",
    ),
    "llava_next": _vlm_only("LlavaNextForConditionalGeneration", "LlavaNextConfig", {"model_type": "qwen2"}, _CLIP, image_token_index="llava_image"),
    "llava_onevision": _vlm_only(
        "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig", {"model_type": "qwen2"}, _SIGLIP,
        image_token_index="llava_image", video_token_index="video",
    ),
    "smolvlm": _vlm_only(
        "SmolVLMForConditionalGeneration", "SmolVLMConfig", {"model_type": "llama"},
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
        image_token_id="llava_image",
    ),
    "gemma3": _vlm_only(
        "Gemma3ForConditionalGeneration", "Gemma3Config", {"model_type": "gemma3_text", "head_dim": 16}, _SIGLIP,
        image_token_index="llava_image", boi_token_index="vision_start", eoi_token_index="vision_end",
    ),
    "internvl": _vlm_only(
        "InternVLForConditionalGeneration", "InternVLConfig", {"model_type": "qwen2"},
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=[28, 28], patch_size=[14, 14]),
        image_token_id="llava_image",
    ),
}  # fmt: skip


def _model(cls_name: str, cfg_name: str, **fixed: Any) -> Callable[[Any, dict], tuple[Any, Any]]:
    """A text LLM family, or a VLM whose config takes the text settings at its top level."""

    def build(tok: Any, t: dict) -> tuple[Any, Any]:
        import transformers

        cfg = getattr(transformers, cfg_name)(**_text(t, **{**_eos(tok), "bos_token_id": None, **fixed}))
        return getattr(transformers, cls_name)(cfg), tok

    return build


_MOE = dict(
    head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1
)
_MLA = dict(
    model_type="deepseek_v3", moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
    topk_group=1, num_key_value_heads=4,
)  # fmt: skip
_LFM2 = dict(layer_types=["conv", "full_attention", "conv", "full_attention"])
_SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# More VLM families, for their layouts (tests pair each with the text LLM named in TEXT_PARTNER).
MORE = {
    "qwen3_moe": _model("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **_MOE),
    "lfm2": _model("Lfm2ForCausalLM", "Lfm2Config", **_LFM2),
    "ernie4_5": _model("Ernie4_5ForCausalLM", "Ernie4_5Config", head_dim=16),
    "hunyuan_dense": _model("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config", head_dim=16),
    "phi3": _model("Phi3ForCausalLM", "Phi3Config"),
    "deepseek_v3": _model("DeepseekV3ForCausalLM", "DeepseekV3Config", **{k: v for k, v in _MLA.items() if k != "model_type"}),
    "qwen3_vl_moe": _vlm_only(
        "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig",
        {**_MOE, "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}},
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT["hidden_size"], patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0, 1], num_position_embeddings=64),
        image_token_id="image", video_token_id="video",
    ),
    "video_llava": _vlm_only(
        "VideoLlavaForConditionalGeneration", "VideoLlavaConfig", {"model_type": "llama"}, {**_CLIP, "num_hidden_layers": 4},
        image_token_index="llava_image", video_token_index="video",
    ),
    "mllama": _vlm_only(
        "MllamaForConditionalGeneration", "MllamaConfig", {"cross_attention_layers": [1], "num_hidden_layers": 5, "bos_token_id": 0},
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2, image_size=28,
             patch_size=14, vision_output_dim=64, intermediate_layers_indices=[0]),
        image_token_index="llava_image",
    ),
    "lfm2_vl": _vlm_only("Lfm2VlForConditionalGeneration", "Lfm2VlConfig", _LFM2, _SMALL_VISION, image_token_id="llava_image"),
    "deepseek_vl": _vlm_only(
        "DeepseekVLForConditionalGeneration", "DeepseekVLConfig", {"model_type": "llama"},
        dict(_SMALL_VISION, image_size=28, patch_size=14), image_token_id="llava_image",
    ),
    "paddleocr_vl": _vlm_only(
        "PaddleOCRVLForConditionalGeneration", "PaddleOCRVLConfig",
        {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [2, 3, 3]}},
        dict(_SMALL_VISION, image_size=28, patch_size=14),
        image_token_id="image",
    ),
    "hunyuan_vl": _vlm_only(
        "HunYuanVLForConditionalGeneration", "HunYuanVLConfig",
        {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2, 2]}},
        _SMALL_VISION, image_token_id="image",
    ),
    "kimi_k25": _vlm_only("Kimi_K25ForConditionalGeneration", "Kimi_K25Config", _MLA, _SMALL_VISION, image_token_id="image"),
}  # fmt: skip


def _phi4(tok: Any, t: dict) -> tuple[Any, Any]:
    import transformers

    cfg = transformers.Phi4MultimodalConfig(
        **_text(t, **{**_eos(tok), "bos_token_id": None}),
        vision_config=dict(_SMALL_VISION, num_hidden_layers=6, image_size=28, patch_size=14),
        audio_config=dict(
            hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2, nemo_conv_channels=32
        ),
    )
    return transformers.Phi4MultimodalForCausalLM(cfg), tok


MORE["phi4_multimodal"] = _phi4

FAMILIES: dict[str, tuple[Callable[[Any, dict], tuple[Any, Any]], str]] = {
    "qwen2": (_qwen2, "<|image_pad|>"),
    "qwen3": (_qwen3, "<|image_pad|>"),
    "llama": (_llama, "<|image_pad|>"),
    "qwen2_5_vl": (_qwen2_5_vl, "<|image_pad|>"),
    "qwen3_vl": (_qwen3_vl, "<|image_pad|>"),
    "llava": (_llava, "<image>"),
    "idefics3": (_idefics3, "<image>"),
    **{name: (fn, "<image>") for name, fn in LAYOUT_ONLY.items()},
    **{name: (fn, "<image>") for name, fn in MORE.items()},
}
# The text LLM family whose language model matches each VLM family's (with the text settings the
# VLM family needs on both sides; a VLM built with them pairs with that LLM).
TEXT_PARTNER = {"qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3", "llava": "qwen2", "idefics3": "llama"}
PARTNERS: dict[str, tuple[str, dict]] = {
    "qwen3_vl_moe": ("qwen3_moe", {}),
    "video_llava": ("llama", {"num_hidden_layers": 1}),
    "mllama": ("llama", {}),
    "lfm2_vl": ("lfm2", {}),
    "deepseek_vl": ("llama", {}),
    "paddleocr_vl": ("ernie4_5", {}),
    "hunyuan_vl": ("hunyuan_dense", {}),
    "phi4_multimodal": ("phi3", {}),
    "kimi_k25": ("deepseek_v3", {}),
}


def build(
    family: str,
    out: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_json: str | None = None,
    **text: Any,
) -> Path:
    """Build a tiny random model of ``family`` and save it (safetensors + processor) to ``out``.

    ``text`` overrides text-config fields, e.g. ``vocab_size=520`` or ``tie_word_embeddings=True``;
    ``tokenizer_json`` replaces the built-in tokenizer (see ``train_tokenizer``).
    """
    if family not in FAMILIES:
        raise ConfigError(
            "family", f"unknown tiny model family {family!r}", f"choose one of {', '.join(FAMILIES)}"
        )
    fn, image_token = FAMILIES[family]
    torch.manual_seed(seed)
    model, proc = fn(tokenizer(image_token, tokenizer_json), text)
    model = model.to(dtype)
    out = Path(out)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        proc.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def build_reasoning_llm(
    vlm: str | Path, out: str | Path, family: str = "qwen2", scale: float = 0.05, seed: int = 1, **text: Any
) -> Path:
    """A tiny text LLM whose weights are the VLM's language model plus a low-rank "reasoning" delta.

    Gives priors and merges realistic statistics (cosine near 1, small relative distance) instead
    of the near-orthogonal weights two independent random inits would have. ``text`` as for
    ``build`` (the VLM's own overrides, e.g. ``num_hidden_layers=28``).
    """
    from surgeon.hub.sources import open_checkpoint
    from surgeon.anatomy.layout import detect_layout
    from surgeon.io.safetensors import DTYPES, write_file

    path = build(family, out, seed=seed, **text)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with open_checkpoint(vlm) as src, open_checkpoint(path) as llm:
        src_layout = detect_layout(list(src.tensors), src.config)
        llm_layout = detect_layout(list(llm.tensors), llm.config)
        for name, info in llm.tensors.items():
            vlm_name = src_layout.lm_name(llm_layout.lm_relative(name) or name)
            if vlm_name not in src.tensors or src.tensors[vlm_name].shape != info.shape:
                raise ConfigError("family", f"{family} does not match the language model of {vlm}")
            w = src.read(vlm_name).float()
            if w.ndim == 2:
                u, v = torch.randn(w.shape[0], 2, generator=gen), torch.randn(2, w.shape[1], generator=gen)
                delta = u @ v / (2 * w.shape[1]) ** 0.5
            else:
                delta = torch.randn(w.shape, generator=gen)
            tensors[name] = (w + scale * w.std() * delta).to(DTYPES[info.dtype])
    write_file(path / "model.safetensors", tensors, {"format": "pt"})
    return path
