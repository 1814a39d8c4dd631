"""Image tokens hidden from the language model's layers from a given layer on (the mask-vision
probe of ``surgeon probe-layers``, after PlaM, arXiv 2601.07645).

    with VisionMask(model, placeholder_ids) as mask:
        mask.start = 14          # layers 14 … L−1: no text token reads an image token
        model(**batch)           # or model.generate(...): the mask follows the KV cache
        mask.start = None        # unmasked

In the masked layers, a query at a text position may not attend to a key at an image or video
placeholder position; image positions still attend as before (their states are computed, but no
text reads them), and the layers below ``start`` are untouched. The language model's attention
runs through a surgeon backend that builds this mask on top of the model's own (causal, padding,
sliding window, Gemma 3's bidirectional image blocks) and then calls ``sdpa``; the vision tower
keeps its own backend. Cross-attention layers (Llama-3.2-Vision) at or after ``start`` pass their
input through unchanged: they are how that family reads images. Token mixers other than attention
(LFM2's short convolutions) still carry image states a few tokens on; ``notes`` says so.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "surgeon_vision_mask"
_ACTIVE: dict[int, Any] = {}  # id(attention module) -> (VisionMask, layer)


class VisionMask:
    """The language model's attention with image keys hidden from text queries in layers ≥ ``start``."""

    def __init__(self, model: Any, placeholder_ids: Any) -> None:
        from surgeon.anatomy.decoder import language_model

        self.model = model
        self.ids = torch.tensor(sorted(int(i) for i in placeholder_ids), dtype=torch.long)
        self.start: int | None = None
        self.keys: torch.Tensor | None = None  # [B, K]: which positions of the sequence so far are image tokens
        decoder = language_model(model)
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cross = set(getattr(text, "cross_attention_layers", None) or ())
        self.layers: dict[int, int] = {}  # id(attention module) -> self-attention layer number
        self.cross: list[tuple[Any, int]] = []  # cross-attention decoder layers and the self layers before them
        self.notes: list[str] = []
        number = 0
        for i, layer in enumerate(decoder.layers):
            if i in cross:
                self.cross.append((layer, number))
                continue
            for module in layer.modules():
                if hasattr(module, "num_key_value_groups") or (type(module).__name__.endswith("Attention") and module is not layer):
                    self.layers[id(module)] = number
            if not any(self.layers.get(id(m)) == number for m in layer.modules()):
                self.notes.append(f"layer {number} mixes tokens without attention (e.g. a short convolution), which carries image states a few tokens on")
            number += 1
        self.num_layers = number
        self._handles: list[Any] = []
        self._previous: Any = None

    def __enter__(self) -> VisionMask:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, lambda *a, **k: sdpa_mask(*a, **{**k, "allow_is_causal_skip": False}))
        config = self.model.config
        key = next((k for k in ("text_config", "llm_config", "language_config") if getattr(config, k, None) is not None), None)
        text = getattr(config, key) if key else config
        self._previous = (key, getattr(text, "_attn_implementation", None) or "sdpa")
        self.model.set_attn_implementation({key: NAME} if key else NAME)
        for module_id, layer in self.layers.items():
            _ACTIVE[module_id] = (self, layer)
        self._handles.append(self.model.register_forward_pre_hook(self._track, with_kwargs=True))
        for layer, before in self.cross:
            self._handles.append(layer.register_forward_hook(self._bypass(before), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module_id in self.layers:
            _ACTIVE.pop(module_id, None)
        key, previous = self._previous
        self.model.set_attn_implementation({key: previous} if key else previous)

    def _track(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Which positions hold image tokens: a prompt resets them, a generated token adds one."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        found = torch.isin(ids, self.ids.to(ids.device))
        if ids.shape[1] > 1 or self.keys is None or self.keys.shape[0] != ids.shape[0]:
            self.keys = found
        else:
            self.keys = torch.cat([self.keys, found], dim=1)

    def _bypass(self, before: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            if self.start is None or before < self.start:
                return output
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

        return hook

    def mask(self, attention_mask: Any, query: torch.Tensor, key: torch.Tensor) -> Any:
        """The model's boolean mask [B, 1, Q, K] with text queries' image keys removed."""
        q, k = query.shape[2], key.shape[2]
        seen = self.keys
        if seen is None or seen.shape[1] < k:
            return attention_mask
        keys = seen[:, :k].to(query.device)
        queries = keys[:, k - q : k]
        hidden = keys[:, None, None, :] & ~queries[:, None, :, None]  # [B, 1, Q, K]
        if attention_mask is None:
            attention_mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
        return attention_mask & ~hidden


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
    """``sdpa`` with the vision mask in the masked layers (the model's own mask elsewhere)."""
    from transformers import AttentionInterface

    found = _ACTIVE.get(id(module))
    if found is not None:
        owner, layer = found
        if owner.start is not None and layer >= owner.start:
            attention_mask = owner.mask(attention_mask, query, key)
    return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, **kwargs)
