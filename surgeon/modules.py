"""Models with surgeon modules (IADA, …): load, list their parameters, save.

    model = load_model("qwen3-vl-iada")                 # no trust_remote_code needed
    add_iada(model, IadaConfig())                       # surgeon.iada, or inject into a plain model
    params = module_parameters(model)                   # {"surgeon.iada.blocks.0.gate": Parameter, …}
    save_model(model, "out/", processor=processor)      # weights + config + modeling_surgeon.py

The modules themselves are defined in ``surgeon/modeling_surgeon.py``, the file that every saved
folder carries for ``trust_remote_code=True`` loading without surgeon.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from surgeon import modeling_surgeon as modeling
from surgeon.errors import ConfigError
from surgeon.output import output_folder
from surgeon.provenance import write_record
from surgeon.safetensors_io import write_file

ADAPTER_MODULES = "surgeon-modules.safetensors"
ADAPTER_SETTINGS = "surgeon-modules.json"


def load_model(path: str | Path, **kwargs: Any) -> Any:
    """Load a model folder (local or Hub) with its surgeon modules attached and their weights
    loaded; a folder without modules loads as its plain transformers class; a peft adapter folder
    (from ``surgeon train``) loads as its base model with the adapter and any surgeon modules
    trained with it.

    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ``revision`` …). Surgeon
    parameters stay fp32 when the model loads in bf16/fp16.
    """
    if (Path(path) / "adapter_config.json").exists():
        return _load_adapter(Path(path), **kwargs)
    try:
        return modeling.load_model(str(path), **kwargs)
    except modeling.SurgeonModelingError as e:
        raise ConfigError("model", str(e)) from None


def module_parameters(model: Any, kind: str | None = None) -> dict[str, Any]:
    """The surgeon modules' parameters by full name, all kinds or one (``"iada"``)."""
    return modeling.module_parameters(model, kind)


def write_model(model: Any, folder: Path, processor: Any = None) -> None:
    """Write ``model`` (and ``processor``) into an existing folder so that it loads with its
    surgeon modules, with ``load_model`` and with ``trust_remote_code=True``."""
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    sections = getattr(model.config, modeling.CONFIG_KEY, None)
    if sections:
        modeling.write_remote_code(folder, type(model).__name__, sections)


def save_model(
    model: Any, output: str | Path, *, processor: Any = None, overwrite: bool = False, record: dict | None = None
) -> Path:
    """Save ``model`` (and ``processor``) as a folder that loads with its surgeon modules, both with
    ``load_model`` and with ``trust_remote_code=True``; atomically, refusing a non-empty output
    unless ``overwrite``. ``record`` is written as ``surgeon.json`` when given."""
    with output_folder(output, overwrite) as tmp:
        write_model(model, tmp, processor)
        if record is not None:
            write_record(tmp, record)
    return Path(output)


def write_adapter_modules(model: Any, folder: Path) -> None:
    """Beside a peft adapter: the surgeon modules trained with it (``surgeon-modules.safetensors``,
    settings in ``surgeon-modules.json``), which ``load_model(folder)`` attaches to the base model
    before the adapter."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = {n.split(f"{modeling.MODULE_ATTR}.", 1)[1]: p for n, p in module_parameters(base).items()}
    if not params:
        return
    write_file(folder / ADAPTER_MODULES, {k: p.detach().contiguous().cpu() for k, p in params.items()}, {"format": "pt"})
    sections = getattr(base.config, modeling.CONFIG_KEY, None) or {}
    (folder / ADAPTER_SETTINGS).write_text(json.dumps(sections, indent=2) + "\n")


def _load_adapter(path: Path, **kwargs: Any) -> Any:
    """A peft adapter folder: its base model, the surgeon modules saved beside it, the adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base_path = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path:
        raise ConfigError("model", f"{path}/adapter_config.json names no base model", "set base_model_name_or_path in it")
    model = load_model(base_path, **kwargs)
    if (path / ADAPTER_SETTINGS).exists():
        sections = json.loads((path / ADAPTER_SETTINGS).read_text())
        for kind in sections:
            modeling.remove_module(model, kind)
        modeling.attach_modules(model, sections)
        weights = load_file(str(path / ADAPTER_MODULES))
        params = module_parameters(model)
        missing = [k for k in params if k.split(f"{modeling.MODULE_ATTR}.", 1)[1] not in weights]
        if missing:
            raise ConfigError("model", f"{path}/{ADAPTER_MODULES} lacks {len(missing)} module weights, e.g. {missing[0]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name.split(f"{modeling.MODULE_ATTR}.", 1)[1]])
    return PeftModel.from_pretrained(model, str(path))
