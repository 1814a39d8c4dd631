"""Models with surgeon modules (IADA, …): load, list their parameters, save.

    model = load_model("qwen3-vl-iada")                 # no trust_remote_code needed
    add_iada(model, IadaConfig())                       # surgeon.iada, or inject into a plain model
    params = module_parameters(model)                   # {"surgeon.iada.blocks.0.gate": Parameter, …}
    save_model(model, "out/", processor=processor)      # weights + config + modeling_surgeon.py

The modules themselves are defined in ``surgeon/modeling_surgeon.py``, the file that every saved
folder carries for ``trust_remote_code=True`` loading without surgeon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgeon import modeling_surgeon as modeling
from surgeon.errors import ConfigError
from surgeon.output import output_folder
from surgeon.provenance import write_record


def load_model(path: str | Path, **kwargs: Any) -> Any:
    """Load a model folder (local or Hub) with its surgeon modules attached and their weights
    loaded; a folder without modules loads as its plain transformers class.

    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ``revision`` …). Surgeon
    parameters stay fp32 when the model loads in bf16/fp16.
    """
    try:
        return modeling.load_model(str(path), **kwargs)
    except modeling.SurgeonModelingError as e:
        raise ConfigError("model", str(e)) from None


def module_parameters(model: Any, kind: str | None = None) -> dict[str, Any]:
    """The surgeon modules' parameters by full name, all kinds or one (``"iada"``)."""
    return modeling.module_parameters(model, kind)


def save_model(
    model: Any, output: str | Path, *, processor: Any = None, overwrite: bool = False, record: dict | None = None
) -> Path:
    """Save ``model`` (and ``processor``) as a folder that loads with its surgeon modules, both with
    ``load_model`` and with ``trust_remote_code=True``; atomically, refusing a non-empty output
    unless ``overwrite``. ``record`` is written as ``surgeon.json`` when given."""
    with output_folder(output, overwrite) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        sections = getattr(model.config, modeling.CONFIG_KEY, None)
        if sections:
            modeling.write_remote_code(tmp, type(model).__name__, sections)
        if record is not None:
            write_record(tmp, record)
    return Path(output)
