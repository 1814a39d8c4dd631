"""Where the language model, vision tower and projector live in a checkpoint's on-disk names.

Recognised from ``config.json`` and tensor names alone (no weights read), for the layouts that
occur on the Hub under transformers 4.x and 5.x:

=====================  ===============================  ===========================  =============================
family                 language model                   vision tower                 projector
=====================  ===============================  ===========================  =============================
Qwen2/2.5-VL (legacy)  ``model.layers.N``               ``visual.``                  ``visual.merger.``
Qwen2/2.5/3-VL (new)   ``model.language_model.layers``  ``model.visual.``            ``model.visual.merger.`` (+deepstack)
LLaVA/-Next/-OV, Gemma3,  ``language_model.model.``     ``vision_tower.``            ``multi_modal_projector.``
InternVL (HF)          or ``model.language_model.``     or ``model.vision_tower.``   (+ ``image_newline``)
Idefics3 / SmolVLM     ``model.text_model.``            ``model.vision_model.``      ``model.connector.``
InternVL (remote code) ``language_model.model.``        ``vision_model.``            ``mlp1.``
text LLMs              ``model.``                       –                            –
=====================  ===============================  ===========================  =============================

The projector and vision prefixes are a short table backed by name patterns for other towers; the
language model's prefix is discovered by structure (``detect_layout``): the prefix of numbered
decoder layers that owns the token embeddings, so new wrappers around a known decoder need no new
table entry.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from surgeon.errors import LayoutError

if TYPE_CHECKING:
    import torch

Role = Literal["language_model", "vision", "projector", "other"]

PROJECTOR_PREFIXES = (
    "model.visual.merger.",
    "visual.merger.",
    "model.visual.deepstack_merger_list.",
    "visual.deepstack_merger_list.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
    "model.connector.",
    "connector.",
    "model.mm_projector.",
    "mlp1.",
    "model.image_newline",
    "image_newline",
)
VISION_PREFIXES = (
    "model.visual.",
    "visual.",
    "model.vision_tower.",
    "vision_tower.",
    "model.vision_model.",
    "vision_model.",
)
# A path component that names a non-language tower (vision, video, audio), wherever it sits.
_VISION_WORD = re.compile(
    r"(^|\.)(vision\w*|visual\w*|image_encoder|image_tower|video_tower|image_embed|img_processor|vit|siglip\w*|"
    r"audio\w*|speech\w*|embed_tokens_extend)\."
)
# Outside the language model, the parts of a VLM that map tower features into it.
_PROJECTOR_WORD = re.compile(r"(^|\.)(\w*projector\w*|merger|aligner|connector|mlp_AR|mlp1|perceive|resampler|image_newline|adapter)(\.|$)")
_LAYER = re.compile(r"^((?:[A-Za-z_]\w*\.)*?)(layers|blocks)\.(\d+)\.")
_TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")


@dataclass(frozen=True)
class Layout:
    """The placement of a checkpoint's tensors.

    ``lm_prefix`` + ``"layers.N."`` (or ``"blocks.N."``: ``layer_word``) names decoder layer N;
    ``lm_prefix`` + ``"embed_tokens.weight"`` the embeddings. ``lm_head`` is the stored output
    projection, or None when tied to the embeddings. ``lm_relative`` strips the prefix so that two
    models' names can be compared: decoder layers are always ``layers.N`` there, numbered over the
    self-attention layers only when the decoder interleaves cross-attention layers
    (``cross_layers``: Llama-3.2-Vision), whose tensors become ``cross_layers.N.…``.
    ``num_layers`` counts the decoder layers a text-only input runs through.

    In a VLM every tensor outside the language model is ``vision`` or ``projector`` (by name:
    towers are vision, what maps their features into the language model is projector).
    """

    kind: Literal["vlm", "llm"]
    lm_prefix: str
    lm_head: str | None
    num_layers: int
    layer_word: str = "layers"
    cross_layers: tuple[int, ...] = ()

    def role(self, name: str) -> Role:
        if name.startswith(PROJECTOR_PREFIXES):
            return "projector"
        if name.startswith(VISION_PREFIXES) or _VISION_WORD.search(name):
            return "vision"
        if name.startswith(self.lm_prefix) or name == self.lm_head:
            return "language_model"
        if self.kind == "vlm":
            return "projector" if _PROJECTOR_WORD.search(name) else "vision"
        return "other"

    def lm_relative(self, name: str) -> str | None:
        """``model.language_model.layers.3.mlp.up_proj.weight`` -> ``layers.3.mlp.up_proj.weight``;
        the output head -> ``lm_head.weight``; anything outside the language model -> None."""
        if name == self.lm_head:
            return "lm_head.weight"
        if self.role(name) != "language_model":
            return None
        rest = name[len(self.lm_prefix) :]
        m = re.match(rf"{self.layer_word}\.(\d+)\.", rest)
        if not m:
            return rest
        i = int(m.group(1))
        tail = rest[m.end() :]
        if i in self.cross_layers:
            return f"cross_layers.{i}.{tail}"
        return f"layers.{i - sum(1 for c in self.cross_layers if c < i)}.{tail}"

    def lm_name(self, relative: str) -> str:
        """The inverse of ``lm_relative`` (``lm_head.weight`` maps to the stored head, or the
        conventional top-level name when the head is tied and not stored)."""
        if relative == "lm_head.weight":
            return self.lm_head or "lm_head.weight"
        m = re.match(r"(layers|cross_layers)\.(\d+)\.", relative)
        if not m:
            return self.lm_prefix + relative
        i = int(m.group(2))
        if m.group(1) == "layers" and self.cross_layers:
            i = [j for j in range(i + len(self.cross_layers) + 1) if j not in self.cross_layers][i]
        return f"{self.lm_prefix}{self.layer_word}.{i}.{relative[m.end():]}"


def layer_index(relative: str) -> int | None:
    """Decoder layer of an LM-relative name (``layers.3.…`` -> 3), None for embeddings/norm/head."""
    m = re.match(r"layers\.(\d+)\.", relative)
    return int(m.group(1)) if m else None


def detect_layout(names: list[str], config: dict, source: str = "checkpoint") -> Layout:
    """Place a checkpoint's tensors. Raises LayoutError listing the prefixes found when it cannot.

    The language model is found by structure, not by size: among the prefixes that hold numbered
    decoder layers (``<prefix>layers.N.`` or ``<prefix>blocks.N.``) outside the towers, the one that
    owns the token embeddings, then the one whose layer count matches the text config's
    ``num_hidden_layers``; the most tensors only break remaining ties. (Video-LLaVA's CLIP towers
    or HunYuan-VL's ViT hold more layer tensors than a short language model.)"""
    present = set(names)
    counts: Counter[tuple[str, str]] = Counter()
    layers: dict[tuple[str, str], set[int]] = {}
    vision = 0
    for name in names:
        if name.startswith(PROJECTOR_PREFIXES) or name.startswith(VISION_PREFIXES) or _VISION_WORD.search(name):
            vision += 1
            continue
        m = _LAYER.match(name)
        if m:
            key = (m.group(1), m.group(2))
            counts[key] += 1
            layers.setdefault(key, set()).add(int(m.group(3)))
    if not counts:
        found = {".".join(n.split(".")[:2]) for n in names}
        raise LayoutError(
            source,
            "cannot find the language model's decoder layers (no '<prefix>layers.<N>.' tensors outside the vision tower)",
            found,
            "surgeon supports the VLM families in its README's family table and Qwen/Llama-style LLMs",
        )
    expected = config_value(config, "num_hidden_layers", "n_layer", "num_layers")

    def rank(key: tuple[str, str]) -> tuple[bool, bool, int]:
        prefix = key[0]
        owns_embed = any(prefix + e in present for e in ("embed_tokens.weight", "tok_embeddings.weight", "wte.weight"))
        return owns_embed, isinstance(expected, int) and len(layers[key]) == expected, counts[key]

    lm_prefix, word = max(counts, key=rank)
    cross = sorted({int(m.group(1)) for n in names if (m := re.match(rf"{re.escape(lm_prefix + word)}\.(\d+)\.cross_attn", n))})
    container = lm_prefix[: -len("model.")] if lm_prefix.endswith("model.") else lm_prefix
    heads = [n for n in (container + "lm_head.weight", "lm_head.weight", container + "output.weight") if n in present]
    kind: Literal["vlm", "llm"] = "vlm" if vision or _is_vlm_config(config) else "llm"
    num = len(layers[(lm_prefix, word)]) - len(cross)
    return Layout(kind, lm_prefix, heads[0] if heads else None, num, word, tuple(cross))


def _is_vlm_config(config: dict) -> bool:
    return "vision_config" in config or any(k in config for k in ("image_token_id", "image_token_index"))


def text_config(config: dict) -> dict:
    """The language model's part of a (possibly nested) config."""
    for key in _TEXT_CONFIG_KEYS:
        if isinstance(config.get(key), dict):
            return config[key]
    return config


def config_value(config: dict, *keys: str, default: object = None) -> object:
    """First of ``keys`` found in the text config, then the top-level config."""
    for cfg in (text_config(config), config):
        for key in keys:
            if cfg.get(key) is not None:
                return cfg[key]
    return default


def placeholder_token_ids(config: dict) -> dict[str, int]:
    """Image and video placeholder token ids from a VLM config (``{"image": id, "video": id}``), at
    its top level or in its ``vision_config`` (Phi-4-multimodal)."""
    out = {}
    for kind in ("image", "video"):
        for cfg in (config, config.get("vision_config") or {}):
            found = [cfg[k] for k in (f"{kind}_token_id", f"{kind}_token_index") if isinstance(cfg.get(k), int)]
            if found:
                out[kind] = found[0]
                break
    return out


def visual_token_mask(input_ids: torch.Tensor, config: object) -> torch.Tensor:
    """bool, shaped like ``input_ids``: True at image and video placeholder positions.

    ``config`` is a config dict, a transformers config, or a ``{"image": id, "video": id}`` map
    from ``placeholder_token_ids``. A text-only config gives an all-False mask.
    """
    import torch

    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        config = to_dict()
    mapping: dict = config if isinstance(config, dict) else {}
    ids = mapping if mapping and set(mapping) <= {"image", "video"} else placeholder_token_ids(mapping)
    wanted = torch.tensor(sorted(ids.values()), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, wanted)
