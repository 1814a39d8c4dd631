"""surgeon modules inside a transformers model: IADA depth aggregation and Image-LoRA value adapters.

This one file is both a module of the ``surgeon`` library and the remote code shipped verbatim
into every model folder that carries surgeon modules. It imports only torch and transformers, so

    AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)   # or ...ForCausalLM

returns the model with its modules on a machine without surgeon, and ``surgeon.load_model(folder)``
returns the same model without remote code. Loading without ``trust_remote_code`` gives the base
model (the extra tensors are reported as unused). ``architectures`` names ``Surgeon<Base>``, so
serving engines that choose a model class by that name refuse the folder rather than serve the
base without its modules.

How a model folder describes its modules::

    config.json   "surgeon": {"iada": {...settings...}, "image_lora": {...}}   one key per module kind
                  "architectures": ["SurgeonQwen2_5_VLForConditionalGeneration"]
                  "auto_map": {"AutoModelForImageTextToText": "modeling_surgeon.SurgeonQwen2_5_VLForConditionalGeneration"}
    weights       surgeon.iada.blocks.0.down, surgeon.iada.blocks.0.up, surgeon.iada.blocks.0.gate, ...
                  surgeon.image_lora.layers.3.down, surgeon.image_lora.layers.3.up, surgeon.image_lora.layers.3.gamma, ...

In memory the modules live in ``model.surgeon`` (an ``nn.ModuleDict`` keyed by kind), so their
parameter names start with ``surgeon.<kind>.``, a prefix that no checkpoint key conversion of the
base architectures touches. ``Surgeon<Architecture>`` is built on demand (module ``__getattr__``)
as a subclass of any transformers architecture; its ``__init__`` attaches the modules named in
``config.surgeon``, so ``from_pretrained`` loads their weights in the same pass as the base weights.

Adding a module kind: write an ``nn.Module`` class with ``kind``, ``__init__(settings, model,
context)`` (creates and initialises its fp32 parameters), ``settings`` (the dict stored in
config.json), ``attach(model) -> list of hook handles`` and ``reset_parameters()``; mark each
submodule that owns parameters with ``surgeon_params = True`` (and a ``reset_parameters()``) so that
a checkpoint lacking them still initialises them; add one entry to ``MODULE_KINDS``. Kinds share the
``TokenContext`` (which tokens of the running forward pass are visual) and the decoder lookup;
a kind that changes value vectors at visual tokens subclasses ``VisualValueEdit``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel

CONFIG_KEY = "surgeon"  # config.json section: {kind: settings}
MODULE_ATTR = "surgeon"  # model.surgeon: the ModuleDict of attached kinds (parameter prefix "surgeon.")
CLASS_PREFIX = "Surgeon"  # SurgeonQwen2_5_VLForConditionalGeneration ...
MODELING_FILE = "modeling_surgeon.py"
# Auto classes written into auto_map, with the transformers mapping that says which architectures they load.
AUTO_CLASSES = {
    "AutoModelForImageTextToText": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "AutoModelForMultimodalLM": "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "AutoModelForVision2Seq": "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
}
# Where the language model's decoder sits, after ``get_decoder()``; paths relative to the top model.
DECODER_PATHS = (
    "model.language_model", "language_model", "model.text_model", "text_model", "language_model.model", "model",
)  # fmt: skip


class SurgeonModelingError(ValueError):
    """A model or settings that the surgeon modules cannot attach to; the message says why."""


# ---------------------------------------------------------------------------------- model anatomy
def decoder_of(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The language model's decoder (the module that runs the layers) and its layer list.

    Tries ``model.get_decoder()`` then ``DECODER_PATHS``, which all name the language model (vision
    towers keep their blocks in ``blocks`` or ``encoder.layers``, never found here).
    """
    tried = []
    candidates: list[tuple[str, Any]] = []
    if callable(getattr(model, "get_decoder", None)):
        try:
            candidates.append(("get_decoder()", model.get_decoder()))
        except Exception:  # noqa: BLE001 - some models raise for "no decoder"; fall back to paths
            pass
    for path in DECODER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        candidates.append((path, obj))
    for path, obj in candidates:
        tried.append(f"{path}.layers")
        layers = getattr(obj, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return obj, layers
    raise SurgeonModelingError(
        f"cannot find the language model's decoder layers in {type(model).__name__} (searched: {', '.join(tried)})"
    )


def running_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers a text-only input runs through, in order: all of them, except the
    cross-attention layers that Llama-3.2-Vision (mllama) skips when there is no image."""
    _, layers = decoder_of(model)
    cross = set(getattr(text_config_of(model.config), "cross_attention_layers", None) or ())
    return [layer for i, layer in enumerate(layers) if i not in cross]


def visual_token_ids(config: Any) -> list[int]:
    """Image and video placeholder token ids of a (VLM) config (at its top level, or in its
    vision config as Phi-4-multimodal keeps them); empty for text models."""
    ids = []
    for kind in ("image", "video"):
        for cfg in (config, getattr(config, "vision_config", None)):
            value = next((getattr(cfg, k, None) for k in (f"{kind}_token_id", f"{kind}_token_index") if isinstance(getattr(cfg, k, None), int)), None)
            if value is not None:
                ids.append(value)
                break
    return ids


def _token_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids


class TokenContext:
    """Which tokens of the forward pass now running are visual (image/video placeholders).

    Forward pre-hooks on the top model and on every module between it and the decoder (the
    multimodal ``model.model``) record ``input_ids`` (VLMs call their language model with
    ``inputs_embeds``, so the ids are only visible there), whichever of them the caller enters by;
    a direct call of the decoder with ``input_ids`` records them too. Without ids every token
    counts as text. ``running`` is True while a forward pass of the model (or a part) is under way.
    """

    def __init__(self, visual_ids: list[int]) -> None:
        self.visual_ids = list(visual_ids)
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._depth = 0  # wrapper (outer) forward calls under way
        self.running = False

    def begin(self, input_ids: torch.Tensor | None, outer: bool) -> None:
        self.running = True
        if outer:
            self._depth += 1
            if self._depth > 1:
                return  # a wrapper called inside another: keep the outermost call's ids
        elif self._depth and input_ids is None:
            return  # the decoder called inside a wrapper: keep the wrapper's ids
        self._ids, self._mask = input_ids, None

    def end(self, outer: bool) -> None:
        if outer:
            self._depth = max(0, self._depth - 1)
        if not self._depth:
            self._ids, self._mask, self.running = None, None, False

    def visual_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Bool ``(batch, seq)`` for ``hidden`` of shape ``(batch, seq, d)``; None when all text."""
        if self._ids is None or not self.visual_ids:
            return None
        if self._mask is None:
            ids = self._ids
            self._mask = torch.isin(ids, torch.tensor(self.visual_ids, device=ids.device))
        if tuple(self._mask.shape) != tuple(hidden.shape[:2]):
            raise SurgeonModelingError(
                f"input_ids have shape {tuple(self._mask.shape)} but the decoder sees {tuple(hidden.shape[:2])} tokens; "
                "surgeon modules need one placeholder token per visual position (expanded by the processor)"
            )
        return self._mask.to(hidden.device)


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def _first_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


# ------------------------------------------------------------------------------------------ IADA
class IadaBlock(nn.Module):
    """One IADA boundary: aggregate a token's states at the previous ``n`` boundaries into it.

    Parameters (modality 0 = text, 1 = visual), for hidden size d and rank r:

    ``down`` (2, r, d)   D_{b,m}          adaptive mode only
    ``up``   (2, d, r)   U_{b,m}          adaptive mode only
    ``depth_logits`` (n,)                  fixed mode only: input-independent depth logits
    ``gate`` (d,) or (1,)  g_b             per-channel or scalar

    Adaptive (docs/methods.md §3): u = D_m·rms(h), q = U_m·u, k_j = rms(c_j), a = softmax_j(⟨q,k_j⟩/√d),
    z = Σ_j a_j·c_j, h ← h + g ⊙ z. Computed as ⟨q,k_j⟩ = inv_rms(c_j)·u·(U_mᵀ c_j) so that the
    normalised keys (n × hidden) are never materialised. Fixed: a = softmax(depth_logits).
    Everything is computed in fp32 and the update is cast to the hidden-state dtype at the end
    (surgeon default), so bf16 models keep fp32 aggregation weights and softmax.
    """

    surgeon_params = True  # owns surgeon parameters: SurgeonMixin._init_weights calls reset_parameters()

    def __init__(
        self, hidden_size: int, rank: int, sources: int, mode: str, gate: str, init_std: float, eps: float, seed: int
    ) -> None:
        super().__init__()
        self.hidden_size, self.rank, self.sources = hidden_size, rank, sources
        self.mode, self.init_std, self.eps, self.seed = mode, init_std, eps, seed
        f32 = torch.float32
        if mode == "adaptive":
            self.down = nn.Parameter(torch.empty(2, rank, hidden_size, dtype=f32))
            self.up = nn.Parameter(torch.empty(2, hidden_size, rank, dtype=f32))
        else:
            self.depth_logits = nn.Parameter(torch.empty(sources, dtype=f32))
        self.gate = nn.Parameter(torch.empty(hidden_size if gate == "channel" else 1, dtype=f32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """g = 0 (identity), U = 0 (uniform first aggregation), fixed-mode logits = 0 (uniform
        mean), as in docs/methods.md §3; D ~ N(0, init_std²) from ``seed`` (scale and seed are not
        specified by the paper; surgeon default init_std = 1/√d, so u has unit scale)."""
        self.gate.zero_()
        if self.mode == "adaptive":
            self.up.zero_()
            gen = torch.Generator().manual_seed(self.seed)
            self.down.copy_(torch.randn(self.down.shape, generator=gen, device="cpu") * self.init_std)
        else:
            self.depth_logits.zero_()

    def inv_rms(self, h: torch.Tensor) -> torch.Tensor:
        """1/rms over the hidden dimension, fp32, shape ``h.shape[:-1]``."""
        return torch.rsqrt(h.float().pow(2).mean(-1) + self.eps)

    def forward(
        self, h: torch.Tensor, states: torch.Tensor, inv_states: torch.Tensor | None, visual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h`` (B, T, d) any dtype; ``states`` (B, T, n, d) fp32; ``inv_states`` (B, T, n) fp32 or
        None (fixed mode); ``visual`` (B, T) bool or None. Returns the updated h (h's dtype) and
        inv_rms(h) (adaptive mode) for later boundaries."""
        inv_h = None
        if self.mode == "fixed":
            weights = torch.softmax(self.depth_logits.to(states.device), -1)
            z = torch.einsum("btnd,n->btd", states, weights)
        else:
            down, up = self.down.to(h.device), self.up.to(h.device)
            hf = h.float()
            inv_h = self.inv_rms(hf)
            r = self.rank
            u = (hf @ down.reshape(2 * r, -1).t()) * inv_h.unsqueeze(-1)  # (B, T, 2r): both modalities
            if visual is None:
                select = u.new_tensor([1.0, 0.0]).expand(*u.shape[:2], 2)
            else:
                vis = visual.to(u.dtype).unsqueeze(-1)
                select = torch.cat([1 - vis, vis], dim=-1)
            u = (u.view(*u.shape[:2], 2, r) * select.unsqueeze(-1)).reshape(u.shape)  # keep the token's modality
            keys_up = states @ up.permute(1, 0, 2).reshape(-1, 2 * r)  # (B, T, n, 2r): U_mᵀ c_j, both m
            scores = (keys_up @ u.unsqueeze(-1)).squeeze(-1) * inv_states / math.sqrt(self.hidden_size)
            weights = torch.softmax(scores, dim=-1)  # (B, T, n)
            z = (weights.unsqueeze(-2) @ states).squeeze(-2)
        out = h + (self.gate.to(h.device) * z).to(h.dtype)
        return out, inv_h


class IadaModule(nn.Module):
    """IADA blocks at the boundaries of the language model's decoder.

    ``settings`` (the ``config.json`` entry ``surgeon.iada``)::

        boundaries  [7, 14, 21, 28]   a boundary after this many decoder layers (boundary 0, the
                                      embedding output, is implicit)
        depth       null or n_d       how many previous boundaries each boundary reads (null: all)
        rank, mode ("adaptive"|"fixed"), gate ("channel"|"scalar")
        hidden_size                   checked against the model
        init_std, eps, seed           D's init scale, RMS epsilon, init seed

    The hooks: a pre-hook on layer 0 records boundary 0, a forward hook on the last layer of each
    block applies that boundary's block, and a hook on the decoder frees the per-forward states.
    The state recorded at a boundary is the decoder's own output there, before that boundary's
    aggregation (not specified by the paper; surgeon default).
    Each token reads only its own states, so generation with a KV cache needs nothing extra.
    Under gradient checkpointing (transformers ≥ 5 checkpoints ``forward``, so module hooks run
    outside the checkpoint) the boundary states are kept, not recomputed.
    """

    kind = "iada"

    def __init__(
        self, settings: dict, model: nn.Module | None, context: TokenContext | None, hidden_size: int | None = None
    ) -> None:
        super().__init__()
        self.settings = check_iada_settings(settings)
        s = self.settings
        if hidden_size is None:
            hidden_size = text_config_of(model.config).hidden_size  # type: ignore[union-attr]
        if hidden_size != s["hidden_size"]:
            raise SurgeonModelingError(
                f"IADA settings are for hidden size {s['hidden_size']}, the model has {hidden_size}"
            )
        depth = s["depth"] or len(s["boundaries"])
        self.sources = [min(depth, i + 1) for i in range(len(s["boundaries"]))]
        self.blocks = nn.ModuleList(
            IadaBlock(hidden_size, s["rank"], n, s["mode"], s["gate"], s["init_std"], s["eps"], s["seed"] + i)
            for i, n in enumerate(self.sources)
        )
        self.context = context
        self._states: list[torch.Tensor] = []
        self._inv: list[torch.Tensor] = []

    def reset_parameters(self) -> None:
        for block in self.blocks:
            block.reset_parameters()  # type: ignore[operator]

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> list[Any]:
        decoder, _ = decoder_of(model)
        layers = running_layers(model)  # boundaries count the layers every input runs through
        last = self.settings["boundaries"][-1]
        if last > len(layers):
            raise SurgeonModelingError(
                f"IADA has a boundary after layer {last} but the decoder has {len(layers)} layers"
            )
        handles = [
            decoder.register_forward_hook(self._end, always_call=True),
            layers[0].register_forward_pre_hook(self._record_embedding, with_kwargs=True),
        ]
        for i, after in enumerate(self.settings["boundaries"]):
            # partial of a bound method, not a closure: copy.deepcopy(model) rebinds it to the copy
            handles.append(layers[after - 1].register_forward_hook(functools.partial(self._boundary, i)))
        return handles

    def _end(self, *_: Any) -> None:
        self._states, self._inv = [], []

    def _push(self, h: torch.Tensor, inv: torch.Tensor | None) -> None:
        self._states.append(h)
        if self.settings["mode"] == "adaptive":
            self._inv.append(inv if inv is not None else self.blocks[0].inv_rms(h))  # type: ignore[operator]

    def _record_embedding(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._end()
        self._push(args[0] if args else kwargs["hidden_states"], None)

    def _boundary(self, index: int, module: nn.Module, args: tuple, output: Any) -> Any:
        h = _first_tensor(output)
        n = self.sources[index]
        if len(self._states) < index + 1:
            raise SurgeonModelingError("IADA boundary states are missing: the decoder layers were not run in order")
        states = torch.stack([s.to(h.device) for s in self._states[index + 1 - n : index + 1]], dim=2).float()
        inv = None
        if self.settings["mode"] == "adaptive":
            inv = torch.stack([s.to(h.device) for s in self._inv[index + 1 - n : index + 1]], dim=2)
        visual = self.context.visual_mask(h) if self.context is not None else None
        new, inv_h = self.blocks[index](h, states, inv, visual)
        self._push(h, inv_h)  # the state the decoder produced here (before aggregation)
        return _replace_output(output, new)


def check_iada_settings(settings: dict) -> dict:
    """Validate and complete an IADA settings dict (raises SurgeonModelingError naming the field).

    Defaults depth=all, adaptive, channel gate, seed 0, eps 1e-6 and init_std 1/√d are surgeon's
    (the paper publishes only its abstract)."""
    s = {"depth": None, "mode": "adaptive", "gate": "channel", "init_std": None, "eps": 1e-6, "seed": 0, **settings}
    for key in ("boundaries", "rank", "hidden_size"):
        if key not in s:
            raise SurgeonModelingError(f"IADA settings lack {key!r}")
    b = s["boundaries"]
    if not b or any(not isinstance(x, int) or x < 1 for x in b) or sorted(set(b)) != list(b):
        raise SurgeonModelingError(f"IADA boundaries must be increasing layer counts ≥ 1, got {b!r}")
    if s["mode"] not in ("adaptive", "fixed"):
        raise SurgeonModelingError(f"IADA mode must be 'adaptive' or 'fixed', got {s['mode']!r}")
    if s["gate"] not in ("channel", "scalar"):
        raise SurgeonModelingError(f"IADA gate must be 'channel' or 'scalar', got {s['gate']!r}")
    if s["init_std"] is None:
        s["init_std"] = s["hidden_size"] ** -0.5
    return s


# ------------------------------------------------------------------------------------- Image-LoRA
def value_projection(layer: nn.Module) -> nn.Linear:
    """The value projection of one decoder layer (``self_attn.v_proj``; under a peft LoRA wrapper
    its base layer, which a merge keeps). Its output is ``(batch, seq, H_kv · d_h)``, head-major."""
    attn = getattr(layer, "self_attn", None)
    proj = getattr(attn, "v_proj", None)
    if proj is None:
        proj = next((m for n, m in layer.named_modules() if n.split(".")[-1] == "v_proj"), None)
    if proj is None:
        raise SurgeonModelingError(
            f"decoder layer {type(layer).__name__} has no v_proj (fused query/key/value projections are not supported)"
        )
    base = getattr(proj, "get_base_layer", None)
    return base() if callable(base) else proj


def value_dims(model: nn.Module) -> tuple[int, int, int]:
    """``(hidden size d, KV heads H_kv, head dim d_h)`` of the language model, checked against the
    shape of its first value projection."""
    text = text_config_of(model.config)
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    _, layers = decoder_of(model)
    proj = value_projection(layers[0])
    if (proj.in_features, proj.out_features) != (text.hidden_size, kv * head_dim):
        raise SurgeonModelingError(
            f"v_proj maps {proj.in_features} -> {proj.out_features} features, but the config says hidden size "
            f"{text.hidden_size} and {kv} KV heads of size {head_dim}"
        )
    return text.hidden_size, kv, head_dim


class VisualValueEdit(nn.Module):
    """Base of the modules that change value vectors at visual-token positions only: a forward hook
    on the value projection of each chosen decoder layer.

    A subclass implements ``edit(layer, x, values) -> values``, with ``x`` (N, d) the inputs of
    ``v_proj`` at the N visual positions of the batch (all images and videos of every sample) and
    ``values`` (N, H_kv, d_h) its outputs there. The hook writes the result back at those rows
    only (``index_put`` on a copy); a batch without visual tokens (text, decode steps of
    ``generate``) returns the output untouched, so text positions are bit-for-bit unchanged.

    Under gradient checkpointing the backward pass re-runs the layer after the forward pass has
    ended (transformers ≥ 5 checkpoints a layer's ``forward``, so ``v_proj`` hooks run inside the
    checkpoint); the re-run reuses the visual positions of the layer's last forward pass. A
    backward pass must therefore follow its own forward pass before the next forward pass of a
    checkpointed layer (as in ordinary training loops).
    """

    def __init__(self, context: TokenContext | None, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.context = context
        self.num_heads, self.head_dim = num_heads, head_dim
        self._rows: tuple[torch.Tensor, Any] | None = None  # (mask of this forward, its (b, t) indices)
        self._replay: dict[int, Any] = {}  # layer -> rows of its last forward (checkpoint re-runs)
        self._owners: dict[int, nn.Module] = {}  # layer -> decoder layer (plain dict: not submodules)

    def edit(self, layer: int, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hook_layers(self, model: nn.Module, indices: list[int]) -> list[Any]:
        """Register the hook on the value projections of decoder layers ``indices``."""
        _, layers = decoder_of(model)
        handles = []
        for i in indices:
            self._owners[i] = layers[i]
            # partial of a bound method, not a closure: copy.deepcopy(model) rebinds it to the copy
            handles.append(value_projection(layers[i]).register_forward_hook(functools.partial(self._hook, i)))
        return handles

    def _visual_rows(self, layer: int, x: torch.Tensor) -> Any:
        context = self.context
        if context is not None and context.running:
            mask = context.visual_mask(x)
            if mask is None:
                rows = None
            elif self._rows is not None and self._rows[0] is mask:
                rows = self._rows[1]
            else:
                index = mask.nonzero(as_tuple=True)
                rows = index if index[0].numel() else None
                self._rows = (mask, rows)
            if torch.is_grad_enabled():
                self._replay[layer] = rows
            return rows
        owner = self._owners.get(layer)
        if owner is not None and owner.training and getattr(owner, "gradient_checkpointing", False) and torch.is_grad_enabled():
            return self._replay.get(layer)  # the backward pass re-running this layer's forward
        return None

    def _hook(self, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        rows = self._visual_rows(layer, args[0])
        if rows is None:
            return None
        x = args[0]
        values = output.view(*output.shape[:-1], self.num_heads, self.head_dim)
        new = self.edit(layer, x[rows], values[rows])
        return values.index_put(rows, new).view_as(output)


class ImageLoraLayer(nn.Module):
    """The Image-LoRA parameters of one decoder layer with H_sel selected KV heads (docs/methods.md §4).

    ``down`` (d, r)           A, shared by the layer's selected heads, init N(0, 1/r²)
    ``up``   (H_sel, r, d_h)  B_h for each selected head (in ``heads`` order), init 0
    ``gamma`` (1,)            γ, init 0.01
    """

    surgeon_params = True  # owns surgeon parameters: SurgeonMixin._init_weights calls reset_parameters()

    def __init__(self, hidden_size: int, rank: int, heads: list[int], head_dim: int, gamma: float, seed: int) -> None:
        super().__init__()
        self.heads, self.rank, self.gamma_init, self.seed = list(heads), rank, gamma, seed
        f32 = torch.float32
        self.down = nn.Parameter(torch.empty(hidden_size, rank, dtype=f32))
        self.up = nn.Parameter(torch.empty(len(heads), rank, head_dim, dtype=f32))
        self.gamma = nn.Parameter(torch.empty(1, dtype=f32))
        self._index: dict[torch.device, torch.Tensor] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A ~ N(0, 1/r²) from ``seed`` (the seed is surgeon's), B = 0 (identity), γ = 0.01."""
        gen = torch.Generator().manual_seed(self.seed)
        self.down.copy_(torch.randn(self.down.shape, generator=gen, device="cpu") / self.rank)
        self.up.zero_()
        self.gamma.fill_(self.gamma_init)

    def head_index(self, device: torch.device) -> torch.Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor(self.heads, dtype=torch.long, device=device)
        return self._index[device]


class ImageLoraModule(VisualValueEdit):
    """Image-LoRA: LoRA on the value projection, at visual tokens only, for selected KV heads only.

    For a layer with H_sel ≥ 1 selected heads and a visual token t with v_proj input x_t::

        ΔV[t, h] = (x_t · A · B_h) · (α/r) · γ / √H_sel      for each selected head h

    added to the value projection's output at head h's columns ``[h·d_h, (h+1)·d_h)``. Layers
    without selected heads get no parameters and no hook. Computed in fp32 (autocast off) and
    cast to the value dtype at the end; parameters are fp32.

    ``settings`` (the ``config.json`` entry ``surgeon.image_lora``)::

        heads         [[1], [], [0, 3], …]   selected KV heads of every decoder layer
        rank, alpha   r and α (reference defaults 8 and 16)
        gamma         γ's initial value (0.01)
        seed          seed of A's random init (layer l uses seed + l; surgeon default)
        hidden_size, num_kv_heads, head_dim   checked against the model

    Parameters: ``surgeon.image_lora.layers.<l>.down|up|gamma``, d·r + H_sel·r·d_h + 1 per layer.
    """

    kind = "image_lora"

    def __init__(self, settings: dict, model: nn.Module | None, context: TokenContext | None) -> None:
        s = check_image_lora_settings(settings)
        super().__init__(context, s["num_kv_heads"], s["head_dim"])
        self.settings = s
        if model is not None:
            dims = value_dims(model)
            want = (s["hidden_size"], s["num_kv_heads"], s["head_dim"])
            if dims != want:
                raise SurgeonModelingError(
                    f"Image-LoRA settings are for (hidden, KV heads, head dim) = {want}, the model has {dims}"
                )
        self.layers = nn.ModuleDict(
            {
                str(i): ImageLoraLayer(s["hidden_size"], s["rank"], heads, s["head_dim"], s["gamma"], s["seed"] + i)
                for i, heads in enumerate(s["heads"])
                if heads
            }
        )
        self.scales = {int(i): s["alpha"] / s["rank"] / math.sqrt(len(layer.heads)) for i, layer in self.layers.items()}

    def reset_parameters(self) -> None:
        for layer in self.layers.values():
            layer.reset_parameters()  # type: ignore[operator]

    def attach(self, model: nn.Module) -> list[Any]:
        _, layers = decoder_of(model)
        if len(layers) != len(self.settings["heads"]):
            raise SurgeonModelingError(
                f"Image-LoRA heads are given for {len(self.settings['heads'])} layers but the decoder has {len(layers)}"
            )
        return self.hook_layers(model, sorted(self.scales))

    def edit(self, layer: int, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        p = self.layers[str(layer)]
        heads = p.head_index(values.device)  # type: ignore[operator]
        with torch.autocast(x.device.type, enabled=False):
            u = x.float() @ p.down.to(x.device)  # (N, r)
            delta = torch.einsum("nr,hrk->nhk", u, p.up.to(x.device)) * (p.gamma.to(x.device) * self.scales[layer])
            picked = values.index_select(1, heads).float() + delta
        return values.index_copy(1, heads, picked.to(values.dtype))


def check_image_lora_settings(settings: dict) -> dict:
    """Validate and complete an Image-LoRA settings dict (raises SurgeonModelingError naming the field).

    Defaults alpha 16 and gamma 0.01 are the reference's; seed 0 is surgeon's."""
    s = {"alpha": 16.0, "gamma": 0.01, "seed": 0, **settings}
    for key in ("heads", "rank", "hidden_size", "num_kv_heads", "head_dim"):
        if key not in s:
            raise SurgeonModelingError(f"Image-LoRA settings lack {key!r}")
    for key in ("rank", "hidden_size", "num_kv_heads", "head_dim"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise SurgeonModelingError(f"Image-LoRA {key} must be a positive integer, got {s[key]!r}")
    heads, kv = s["heads"], s["num_kv_heads"]
    if not isinstance(heads, list) or not all(isinstance(h, list) for h in heads):
        raise SurgeonModelingError("Image-LoRA heads must be a list with one list of KV heads per decoder layer")
    for i, layer in enumerate(heads):
        if any(not isinstance(h, int) or not 0 <= h < kv for h in layer) or len(set(layer)) != len(layer):
            raise SurgeonModelingError(f"Image-LoRA heads of layer {i} must be distinct KV heads in [0, {kv}), got {layer!r}")
    if not any(heads):
        raise SurgeonModelingError("Image-LoRA selects no head in any layer")
    s["heads"] = [sorted(layer) for layer in heads]
    s["alpha"], s["gamma"] = float(s["alpha"]), float(s["gamma"])
    return s


# ------------------------------------------------------------------------------ registry + attach
MODULE_KINDS: dict[str, type[nn.Module]] = {
    "iada": IadaModule,
    "image_lora": ImageLoraModule,
}


class SurgeonModules(nn.ModuleDict):
    """``model.surgeon``: the attached module kinds, their shared TokenContext and hook handles.

    Its hooks on the top model (outer) and the decoder (inner) tell the context which ``input_ids``
    the running forward pass has; they are bound methods so that ``copy.deepcopy(model)`` works.
    """

    def __init__(self, context: TokenContext) -> None:
        super().__init__()
        self.context = context
        self.handles: dict[str, list[Any]] = {}

    def _outer_begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.context.begin(_token_ids(args, kwargs), outer=True)

    def _outer_end(self, *_: Any) -> None:
        self.context.end(outer=True)

    def _inner_begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.context.begin(_token_ids(args, kwargs), outer=False)

    def _inner_end(self, *_: Any) -> None:
        self.context.end(outer=False)


def text_config_of(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _wrappers(model: nn.Module, decoder: nn.Module) -> list[nn.Module]:
    """The top model and every module on the path from it down to the decoder (exclusive)."""
    path = next((name for name, m in model.named_modules() if m is decoder), "")
    found, module = [model], model
    for part in path.split(".")[:-1] if path else []:
        module = getattr(module, part)
        found.append(module)
    return found


def _container(model: nn.Module) -> SurgeonModules:
    existing = getattr(model, MODULE_ATTR, None)
    if isinstance(existing, SurgeonModules):
        return existing
    context = TokenContext(visual_token_ids(model.config))
    container = SurgeonModules(context)
    setattr(model, MODULE_ATTR, container)
    decoder, _ = decoder_of(model)
    container.handles["context"] = []
    for wrapper in _wrappers(model, decoder):
        container.handles["context"] += [
            wrapper.register_forward_pre_hook(container._outer_begin, with_kwargs=True),
            wrapper.register_forward_hook(container._outer_end, always_call=True),
        ]
    if decoder is not model:
        container.handles["context"] += [
            decoder.register_forward_pre_hook(container._inner_begin, with_kwargs=True),
            decoder.register_forward_hook(container._inner_end, always_call=True),
        ]
    return container


def token_context(model: nn.Module) -> TokenContext:
    """The model's shared TokenContext (creating ``model.surgeon`` and its hooks if needed), for
    temporary edits such as head-scoring probes that are not attached as module kinds."""
    return _container(model).context


def add_module(model: nn.Module, kind: str, settings: dict) -> nn.Module:
    """Attach one module kind to ``model`` (replacing an attached one of that kind) and record its
    settings in ``model.config.surgeon``. Parameters are fp32, on the device of decoder layer 0."""
    if kind not in MODULE_KINDS:
        raise SurgeonModelingError(f"unknown surgeon module kind {kind!r}; this file knows: {', '.join(MODULE_KINDS)}")
    remove_module(model, kind)
    container = _container(model)
    _, layers = decoder_of(model)
    device = next((p.device for p in layers[0].parameters()), None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        module = MODULE_KINDS[kind](settings, model, container.context)  # initialised by its constructor
    container[kind] = module
    container.handles[kind] = module.attach(model)  # type: ignore[operator]
    sections = dict(getattr(model.config, CONFIG_KEY, None) or {})
    sections[kind] = module.settings  # type: ignore[assignment]
    setattr(model.config, CONFIG_KEY, sections)
    return module


def attach_modules(model: nn.Module, sections: dict) -> None:
    """Attach every kind named in a ``config.surgeon`` dict (``{kind: settings}``)."""
    for kind in [k for k in MODULE_KINDS if k in sections] + [k for k in sections if k not in MODULE_KINDS]:
        add_module(model, kind, sections[kind])


def remove_module(model: nn.Module, kind: str) -> None:
    """Detach one kind (hooks, parameters, config entry); the model is the base model again."""
    container = getattr(model, MODULE_ATTR, None)
    if not isinstance(container, SurgeonModules) or kind not in container:
        return
    for handle in container.handles.pop(kind, []):
        handle.remove()
    del container[kind]
    sections = dict(getattr(model.config, CONFIG_KEY, None) or {})
    sections.pop(kind, None)
    setattr(model.config, CONFIG_KEY, sections)


def module_parameters(model: nn.Module, kind: str | None = None) -> dict[str, nn.Parameter]:
    """The surgeon modules' parameters by full name (``surgeon.iada.blocks.0.gate`` …)."""
    prefix = MODULE_ATTR + "." + (kind + "." if kind else "")
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix)}


# --------------------------------------------------------------------- the remote-code model class
class SurgeonMixin:
    """Mixed into ``Surgeon<Architecture>``: attaches the modules named in ``config.surgeon``,
    keeps their parameters in fp32 when loading in bf16/fp16, initialises them when a checkpoint
    lacks them, and makes ``save_pretrained`` write a complete remote-code folder."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        keep = set(getattr(self, "_keep_in_fp32_modules_strict", None) or ())
        self._keep_in_fp32_modules_strict = keep | {MODULE_ATTR}
        sections = getattr(config, CONFIG_KEY, None) or {}
        if sections:
            attach_modules(self, sections)  # type: ignore[arg-type]

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "surgeon_params", False):
            module.reset_parameters()  # type: ignore[operator]
            return
        super()._init_weights(module)  # type: ignore[misc]

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        result = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        sections = getattr(self.config, CONFIG_KEY, None)  # type: ignore[attr-defined]
        if sections:
            write_remote_code(save_directory, base_architecture(type(self)).__name__, sections)
        return result


_CLASSES: dict[str, type] = {}


def base_architecture(cls: type) -> type:
    """The transformers class under a Surgeon class (or the class itself)."""
    name = cls.__name__.removeprefix(CLASS_PREFIX)
    for klass in cls.__mro__[1:]:
        if klass.__name__ == name and issubclass(klass, PreTrainedModel):
            return klass
    return cls


def surgeon_class(base: type) -> type:
    """``Surgeon<base>``: ``base`` plus the surgeon modules named in its config. Cached."""
    name = CLASS_PREFIX + base.__name__
    if name in _CLASSES:
        return _CLASSES[name]
    from transformers.generation import GenerationMixin

    bases = (SurgeonMixin, base) + ((GenerationMixin,) if issubclass(base, GenerationMixin) else ())
    namespace = {"__module__": __name__, "__qualname__": name, "__doc__": f"{base.__name__} with surgeon modules."}
    cls = type(name, bases, namespace)
    _register_key_conversion(name, base)
    _CLASSES[name] = cls
    return cls


def _register_key_conversion(name: str, base: type) -> None:
    """Give ``Surgeon<base>`` the checkpoint key conversion of ``base`` (transformers skips the
    conversion for classes defined outside transformers unless they are registered)."""
    try:
        from transformers import conversion_mapping as cm
    except ImportError:  # transformers 4.x: the class attribute is inherited
        return
    model_type = getattr(getattr(base, "config_class", None), "model_type", None)
    mapping = cm.get_checkpoint_conversion_mapping(base.__name__)
    if mapping is None and model_type:
        mapping = cm.get_checkpoint_conversion_mapping(model_type)
    if mapping is not None:
        cm.register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


def architecture_class(name: str) -> type:
    """The transformers class named by ``config.architectures[0]`` (a Surgeon prefix is dropped)."""
    base = name.removeprefix(CLASS_PREFIX)
    cls = getattr(transformers, base, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise SurgeonModelingError(
            f"architecture {name!r} is not a model class of transformers {transformers.__version__}"
        )
    return cls


def __getattr__(name: str) -> type:  # PEP 562: auto_map names Surgeon<Architecture>
    if name.startswith(CLASS_PREFIX) and name != CLASS_PREFIX:
        try:
            return surgeon_class(architecture_class(name))
        except SurgeonModelingError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def auto_map(architecture: str) -> dict[str, str]:
    """``auto_map`` entries: every auto class whose transformers mapping loads ``architecture``."""
    from transformers.models.auto import modeling_auto

    base = architecture.removeprefix(CLASS_PREFIX)
    out = {}
    for auto_class, mapping_name in AUTO_CLASSES.items():
        names = getattr(modeling_auto, mapping_name, {})
        if any(base == v or (isinstance(v, (tuple, list)) and base in v) for v in names.values()):
            out[auto_class] = f"{MODELING_FILE[:-3]}.{CLASS_PREFIX}{base}"
    if not out:
        raise SurgeonModelingError(f"no transformers auto class loads {base!r}, so it cannot carry remote code")
    return out


def write_remote_code(folder: str | Path, architecture: str, sections: dict) -> None:
    """Make a saved model folder load with ``trust_remote_code=True``: copy this file into it and
    set ``surgeon``, ``auto_map`` and ``architectures`` in its config.json. The architecture is
    ``Surgeon<Base>``, a name of its own: a serving engine that picks its model class by that name
    (vLLM, SGLang) refuses the folder instead of loading it as the base and dropping the modules."""
    folder = Path(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    base = architecture.removeprefix(CLASS_PREFIX)
    config["architectures"] = [CLASS_PREFIX + base]
    config["auto_map"] = auto_map(base)
    config[CONFIG_KEY] = sections
    path.write_text(json.dumps(config, indent=2) + "\n")
    if Path(__file__).resolve() != (folder / MODELING_FILE).resolve():
        shutil.copyfile(__file__, folder / MODELING_FILE)


def load_model(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Load a model folder with its surgeon modules (plain folders load as their base class).

    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ``revision`` …).
    """
    from transformers import AutoConfig

    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only", "subfolder") if k in kwargs}
    config = AutoConfig.from_pretrained(path, **hub)
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise SurgeonModelingError(f"{path}: config.json names no architecture")
    cls = architecture_class(architectures[0])
    if getattr(config, CONFIG_KEY, None):
        cls = surgeon_class(cls)
    return cls.from_pretrained(path, config=config, **kwargs)
