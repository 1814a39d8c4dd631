"""Where things are in a loaded model (``torch.nn.Module``), as ``layout`` finds them in a checkpoint:
the language model's decoder, its parameters under the LM-relative names priors use, and the
vision tower and projector beside it.

The remote-code file ``surgeon/modules/modeling_surgeon.py`` must run without surgeon installed, so it
carries its own ``decoder_of`` with the same search; a test holds the two to the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from surgeon.errors import ConfigError

# Where the language model's decoder sits when ``get_decoder()`` does not say; paths from the top model.
DECODER_PATHS = (
    "model.language_model", "language_model", "model.text_model", "text_model", "language_model.model", "model",
)  # fmt: skip

def module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """The dotted name of ``module`` inside ``model`` (found by identity)."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``layers``, ``embed_tokens``, ``norm``) of a VLM or text LLM: ``get_decoder()``,
    else the first of ``DECODER_PATHS`` that holds a non-empty ``layers`` list."""
    candidates = []
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            candidates.append(get())
        except Exception:  # noqa: BLE001 - some models raise for "no decoder"; fall back to paths
            pass
    for path in DECODER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        candidates.append(obj)
    for decoder in candidates:
        layers = getattr(decoder, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return decoder
    tried = ", ".join(["get_decoder()", *DECODER_PATHS])
    raise ConfigError("model", f"cannot find the language model's decoder layers in {type(model).__name__} (searched: {tried})")

def lm_parameters(model: torch.nn.Module, buffers: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The language model's parameters under their LM-relative names (``layers.3.mlp.up_proj.weight``,
    ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``), the names priors use. As in
    ``surgeon.anatomy.layout.Layout``, decoder layers are numbered over the self-attention layers when the
    decoder interleaves cross-attention layers (Llama-3.2-Vision), which become ``cross_layers.N``.
    ``buffers``: also the persistent buffers (e.g. DeepSeek-V3's router correction bias), which
    checkpoints store beside the weights."""
    decoder = language_model(model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cross = sorted(getattr(text, "cross_attention_layers", None) or ())
    seen: set[int] = set()
    tensors = list(decoder.named_parameters())
    if buffers:
        persistent = {n for n, _ in decoder.state_dict().items()}
        tensors += [(n, b) for n, b in decoder.named_buffers() if n in persistent]
    for name, p in tensors:
        if not name.startswith("surgeon"):
            seen.add(id(p))
            m = re.match(r"layers\.(\d+)\.", name)
            if m and cross:
                i = int(m.group(1))
                name = f"cross_layers.{i}.{name[m.end():]}" if i in cross else f"layers.{i - sum(c < i for c in cross)}.{name[m.end():]}"
            yield name, p
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head.weight) not in seen:
        yield "lm_head.weight", head.weight
def vision_modules(model: torch.nn.Module) -> list[str]:
    """Module paths of the vision tower and projector: the language model's siblings that hold
    parameters (``model.visual``; ``model.vision_tower`` and ``model.multi_modal_projector`` …)."""
    path = module_path(model, language_model(model))
    parent = path.rpartition(".")[0]
    owner = model.get_submodule(parent) if parent else model
    decoder = language_model(model)
    return [
        f"{parent}.{name}" if parent else name
        for name, child in owner.named_children()
        if child is not decoder and any(True for _ in child.parameters()) and name != "surgeon"
    ]
