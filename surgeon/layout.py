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

The projector and vision prefixes are a short table; the language model's prefix is discovered:
it is the prefix of the decoder-layer tensors (``<prefix>layers.<N>.``) outside vision and
projector, so new wrappers around a known decoder need no new table entry.
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
_VISION_WORD = re.compile(r"(^|\.)(vision\w*|visual\w*|image_encoder)\.")
_LAYER = re.compile(r"^((?:[A-Za-z_]\w*\.)*?)layers\.(\d+)\.")
_TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")


@dataclass(frozen=True)
class Layout:
    """The placement of a checkpoint's tensors.

    ``lm_prefix`` + ``"layers.N."`` names decoder layer N; ``lm_prefix`` + ``"embed_tokens.weight"``
    the embeddings. ``lm_head`` is the stored output projection, or None when tied to the
    embeddings. ``lm_relative`` strips the prefix so that two models' names can be compared.
    """

    kind: Literal["vlm", "llm"]
    lm_prefix: str
    lm_head: str | None
    num_layers: int

    def role(self, name: str) -> Role:
        if name.startswith(PROJECTOR_PREFIXES):
            return "projector"
        if name.startswith(VISION_PREFIXES) or _VISION_WORD.search(name):
            return "vision"
        if name.startswith(self.lm_prefix) or name == self.lm_head:
            return "language_model"
        return "other"

    def lm_relative(self, name: str) -> str | None:
        """``model.language_model.layers.3.mlp.up_proj.weight`` -> ``layers.3.mlp.up_proj.weight``;
        the output head -> ``lm_head.weight``; anything outside the language model -> None."""
        if name == self.lm_head:
            return "lm_head.weight"
        if self.role(name) == "language_model":
            return name[len(self.lm_prefix) :]
        return None

    def lm_name(self, relative: str) -> str:
        """The inverse of ``lm_relative`` (``lm_head.weight`` maps to the stored head, or the
        conventional top-level name when the head is tied and not stored)."""
        if relative == "lm_head.weight":
            return self.lm_head or "lm_head.weight"
        return self.lm_prefix + relative


def layer_index(relative: str) -> int | None:
    """Decoder layer of an LM-relative name (``layers.3.…`` -> 3), None for embeddings/norm/head."""
    m = re.match(r"layers\.(\d+)\.", relative)
    return int(m.group(1)) if m else None


def detect_layout(names: list[str], config: dict, source: str = "checkpoint") -> Layout:
    """Place a checkpoint's tensors. Raises LayoutError listing the prefixes found when it cannot."""
    prefixes: Counter[str] = Counter()
    layers: dict[str, set[int]] = {}
    vision = 0
    for name in names:
        if name.startswith(PROJECTOR_PREFIXES) or name.startswith(VISION_PREFIXES) or _VISION_WORD.search(name):
            vision += 1
            continue
        m = _LAYER.match(name)
        if m:
            prefixes[m.group(1)] += 1
            layers.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not prefixes:
        found = {".".join(n.split(".")[:2]) for n in names}
        raise LayoutError(
            source,
            "cannot find the language model's decoder layers (no '<prefix>layers.<N>.' tensors outside the vision tower)",
            found,
            "surgeon supports Qwen2/2.5/3-VL, LLaVA(-Next/-OneVision), Idefics3/SmolVLM, Gemma3, InternVL and Qwen/Llama LLMs",
        )
    lm_prefix = prefixes.most_common(1)[0][0]
    container = lm_prefix[: -len("model.")] if lm_prefix.endswith("model.") else lm_prefix
    present = set(names)
    heads = [n for n in (container + "lm_head.weight", "lm_head.weight", container + "output.weight") if n in present]
    kind: Literal["vlm", "llm"] = "vlm" if vision or _is_vlm_config(config) else "llm"
    return Layout(kind, lm_prefix, heads[0] if heads else None, len(layers[lm_prefix]))


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
    """Image and video placeholder token ids from a VLM config (``{"image": id, "video": id}``)."""
    out = {}
    for kind in ("image", "video"):
        for key in (f"{kind}_token_id", f"{kind}_token_index"):
            if isinstance(config.get(key), int):
                out[kind] = config[key]
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
