"""Module families of language-model tensors, and selections of them by family, regex and layer.

Names here are LM-relative (``Layout.lm_relative``): ``layers.3.mlp.up_proj.weight``,
``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``. Every such name belongs to exactly one
family:

==============  =======================================================================================
family          tensors
==============  =======================================================================================
``attn``        a layer's token mixer, whatever its kind: ``layers.N.self_attn.*`` (q/k/v/o projections
                and biases), short convolutions (``conv.*``, LFM2), linear attention, state-space
                mixers (``mamba``, ``mixer``, ``ssm`` …); norms excepted
``mlp``         ``layers.N.mlp.*`` (gate/up/down projections; MoE experts and routers), except norms
``norm``        per-layer norms: ``input_layernorm``, ``post_attention_layernorm``,
                ``pre/post_feedforward_layernorm``, ``self_attn.q_norm`` / ``k_norm`` …
``final_norm``  the norm after the last decoder layer (``norm.weight``)
``embed``       ``embed_tokens.weight``
``head``        ``lm_head.weight`` (only when stored: a tied head is its embeddings)
``other``       anything else in the language model (e.g. Llama-3.2-Vision's cross-attention layers,
                ``cross_layers.N.*``, which text LLMs do not have)
==============  =======================================================================================

The reference DRIFT code's ``norm`` preset covers input/post-attention norms only and its ``full``
leaves out the final norm. Here ``norm`` is every per-layer norm, the final norm is its own family
(it sits outside every layer, so layer filters cannot reach it), and ``full`` is every
language-model tensor (not specified by the paper; surgeon default).

    sel = Selection(modules=parse_modules("attn,mlp,re:q_norm"), layers=parse_layers("0-13,20"))
    names = select(relative_names, sel, num_layers=28)     # SelectionError if nothing matches

Layer filters (``layers``, ``skip_first``) apply to decoder-layer tensors only; tensors outside the
layers (embeddings, final norm, head) are chosen by ``modules`` alone, as in the reference.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from surgeon.errors import ConfigError, SelectionError
from surgeon.anatomy.layout import layer_index

FAMILIES = ("attn", "mlp", "norm", "final_norm", "embed", "head", "other")
# Narrower presets (arXiv 2510.08564: tuning only the attention projections, or only the MLP's
# gate and up projections, forgets less): ``attn_proj`` is the token mixer's linear projections
# (q/k/v/o, fused qkv, MLA's q_a/q_b/kv_a/kv_b, LFM2's conv in/out), ``gate_up`` the MLP's and its
# experts' gate and up projections (fused gate_up, Mixtral's w1/w3), never a router.
NARROW = ("attn_proj", "gate_up")
PRESETS = ("attn", "mlp", "norm", "final_norm", "embed", "head", "full", *NARROW)
_ATTN_PROJ = re.compile(r"_proj(_with_mqa)?$|^(qkv|wqkv|Wqkv|query_key_value|c_attn|wq|wk|wv|wo)$")
_GATE_UP = re.compile(r"^(gate_proj|up_proj|gate_up_proj|w1|w3)$")
DEFAULT_MODULES = ("attn", "mlp")
_ATTN = {
    "self_attn", "attention", "attn", "self_attention", "conv", "short_conv", "mixer", "token_mixer", "linear_attn",
    "linear_attention", "mamba", "ssm", "time_mix", "time_mixer",
}  # fmt: skip
_MLP = {"mlp", "feed_forward", "block_sparse_moe", "ffn", "moe"}
_EMBED = {"embed_tokens.weight", "tok_embeddings.weight", "wte.weight"}


def family(relative: str) -> str:
    """The family of an LM-relative tensor name (one of ``FAMILIES``)."""
    if relative == "lm_head.weight":
        return "head"
    if relative in _EMBED:
        return "embed"
    modules = relative.split(".")[:-1]  # drop weight / bias
    if relative.startswith("cross_layers."):
        return "other"
    if layer_index(relative) is None:
        return "final_norm" if modules and "norm" in modules[-1] else "other"
    inner = modules[2:]  # after "layers.N"
    if not inner:
        return "other"
    if "norm" in inner[-1] or inner[-1].startswith("ln"):
        return "norm"
    if inner[0] in _ATTN:
        return "attn"
    if inner[0] in _MLP:
        return "mlp"
    return "other"


def parse_modules(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"attn,mlp,re:q_norm"`` -> ``("attn", "mlp", "re:q_norm")``, checked: presets must exist
    and regexes must compile (ConfigError on field ``modules`` otherwise)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    if not items:
        raise ConfigError("modules", "is empty", f"give presets ({', '.join(PRESETS)}) or re:REGEX")
    for item in items:
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as e:
                raise ConfigError("modules", f"{item!r} is not a valid regular expression ({e})") from None
        elif item not in PRESETS:
            raise ConfigError("modules", f"unknown preset {item!r}", f"choose from {', '.join(PRESETS)}, or write re:REGEX")
    return tuple(dict.fromkeys(items))


def parse_layers(text: str | Iterable[int] | None) -> tuple[int, ...] | None:
    """``"0-13,20"`` -> ``(0, 1, …, 13, 20)``; None or empty -> None (all layers); layer numbers
    given as a sequence are checked and sorted."""
    if text is not None and not isinstance(text, str):
        layers = tuple(text)
        if not all(isinstance(i, int) and i >= 0 for i in layers):
            raise ConfigError("layers", f"must be layer numbers ≥ 0, got {layers}")
        return tuple(sorted(set(layers)))
    if text is None or not str(text).strip():
        return None
    out: set[int] = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError("layers", f"cannot read {part.strip()!r} as a layer or range", "write it like 0-13,20")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ConfigError("layers", f"range {part.strip()!r} runs backwards", "write the lower layer first, e.g. 0-13")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def parse_selection(config: object) -> None:
    """In a frozen config with ``modules`` and ``layers`` fields, read them from text
    (``"attn,mlp"``, ``"0-13,20"``) or check them as given; called by its ``__post_init__``."""
    object.__setattr__(config, "modules", parse_modules(config.modules))  # type: ignore[attr-defined]
    object.__setattr__(config, "layers", parse_layers(config.layers))  # type: ignore[attr-defined]


class SelectsTensors:
    """For frozen config dataclasses with ``modules``, ``layers``, ``skip_first`` and ``bias`` fields
    (prior and merge): ``selection`` is them as a ``Selection``; ``parse_selection(self)`` in their
    ``__post_init__`` reads them from text."""

    @property
    def selection(self) -> Selection:
        layers = self.layers  # type: ignore[attr-defined]
        return Selection(tuple(self.modules), tuple(layers) if layers is not None else None, self.skip_first, self.bias)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Selection:
    """Which LM-relative tensors to act on.

    ``modules``: presets (``PRESETS``) and ``re:REGEX`` items (``re.search`` on the LM-relative
    name), combined by union. ``layers``: decoder layers to keep (None: all); ``skip_first``: drop
    layers ``0 .. skip_first-1``; ``bias``: include ``*.bias`` tensors.
    """

    modules: tuple[str, ...] = DEFAULT_MODULES
    layers: tuple[int, ...] | None = None
    skip_first: int = 0
    bias: bool = True

    def matches_module(self, item: str, relative: str) -> bool:
        """Whether one ``modules`` item matches a name (filters aside)."""
        if item.startswith("re:"):
            return re.search(item[3:], relative) is not None
        if item in NARROW:
            parts = relative.split(".")
            leaf = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]  # fused experts: no .weight
            want, pattern = ("attn", _ATTN_PROJ) if item == "attn_proj" else ("mlp", _GATE_UP)
            return family(relative) == want and pattern.search(leaf) is not None
        return item == "full" or family(relative) == item

    def passes_filters(self, relative: str) -> bool:
        """The layer and bias filters alone."""
        if not self.bias and relative.endswith(".bias"):
            return False
        layer = layer_index(relative)
        if layer is None:
            return True
        return layer >= self.skip_first and (self.layers is None or layer in self.layers)

    def accepts(self, relative: str) -> bool:
        return self.passes_filters(relative) and any(self.matches_module(m, relative) for m in self.modules)

    def describe(self) -> str:
        """One line for reports: ``attn,mlp; layers 0-13,20; skip first 2; no biases``."""
        parts = [",".join(self.modules)]
        if self.layers is not None:
            parts.append(f"layers {format_layers(self.layers)}")
        if self.skip_first:
            parts.append(f"skip first {self.skip_first}")
        if not self.bias:
            parts.append("no biases")
        return "; ".join(parts)


def format_layers(layers: Iterable[int]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    nums = sorted(set(layers))
    runs: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        runs.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(runs)


def family_examples(relatives: Iterable[str]) -> list[str]:
    """``["attn (84 tensors, e.g. layers.0.self_attn.q_proj.weight)", …]`` for error messages."""
    seen: dict[str, list[str]] = {}
    for rel in relatives:
        seen.setdefault(family(rel), []).append(rel)
    return [f"{fam} ({len(names)} tensors, e.g. {names[0]})" for fam, names in seen.items()]


def select(relatives: Iterable[str], selection: Selection, num_layers: int | None = None) -> list[str]:
    """The names ``selection`` accepts, in the given order.

    Raises ConfigError when ``layers`` / ``skip_first`` name layers the model lacks (given
    ``num_layers``), and SelectionError, listing the families present with example names, when a
    ``modules`` item matches no name or the whole selection matches nothing.
    """
    names = list(relatives)
    if num_layers is not None:
        _check_layers(selection, num_layers)
    available = family_examples(names)
    for item in selection.modules:
        if not any(selection.matches_module(item, n) for n in names):
            tied = item == "head" and any(family(n) == "embed" for n in names)
            why = "the model ties its output head to its embeddings: select embed" if tied else None
            raise SelectionError("module family" if not item.startswith("re:") else "pattern", item, available, why)
    chosen = [n for n in names if selection.accepts(n)]
    if not chosen:
        raise SelectionError("selection", selection.describe(), available)
    return chosen


def _check_layers(selection: Selection, num_layers: int) -> None:
    last = num_layers - 1
    if selection.layers and max(selection.layers) > last:
        raise ConfigError(
            "layers", f"layer {max(selection.layers)} does not exist", f"the model has {num_layers} decoder layers (0-{last})"
        )
    if selection.skip_first < 0:
        raise ConfigError("skip_first", "must not be negative")
    if selection.skip_first >= num_layers:
        raise ConfigError("skip_first", f"{selection.skip_first} skips every layer", f"the model has {num_layers} decoder layers")
