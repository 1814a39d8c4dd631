"""Models with surgeon modules (IADA, Image-LoRA, …): load, list their parameters, save.

    model = load_model("qwen3-vl-iada")                 # no trust_remote_code needed
    add_iada(model, IadaConfig())                       # surgeon.modules.iada, or inject into a plain model
    params = module_parameters(model)                   # {"surgeon.iada.blocks.0.gate": Parameter, …}
    save_model(model, "out/", processor=processor)      # weights + config + modeling_surgeon.py
    write_module_folder(model, open_checkpoint("base/"), folder)   # base files linked + module shards

The modules themselves are defined in ``surgeon/modules/modeling_surgeon.py``, the file that every saved
folder carries for ``trust_remote_code=True`` loading without surgeon.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from surgeon.modules import modeling_surgeon as modeling
from surgeon.io.checkpoint import INDEX_NAME, PICKLE_SUFFIXES
from surgeon.errors import CheckpointError, ConfigError
from surgeon.io.output import link_or_copy, output_folder, write_index
from surgeon.io.provenance import FILE_NAME as RECORD_NAME
from surgeon.io.provenance import write_record
from surgeon.io.safetensors import write_file

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
    if not Path(path).exists():
        from surgeon.hub.download import adapter_snapshot
        from surgeon.hub.repo_ids import REPO_ID

        if REPO_ID.match(str(path)) and (snapshot := adapter_snapshot(str(path), kwargs.get("revision"))):
            return _load_adapter(Path(snapshot), **{k: v for k, v in kwargs.items() if k != "revision"})
    if Path(path).is_dir():
        from surgeon.anatomy.limits import check_checkpoint
        from surgeon.hub.sources import open_checkpoint

        with open_checkpoint(path) as ckpt:
            check_checkpoint(ckpt)  # sizes within limits and matching the weights, before anything is built
    try:
        return modeling.load_model(str(path), **kwargs)
    except modeling.SurgeonModelingError as e:
        raise ConfigError("model", str(e)) from None
    except RuntimeError as e:  # transformers refusing weights whose shapes its config does not give
        if "mismatched" not in str(e) and "size mismatch" not in str(e):
            raise
        raise CheckpointError(str(path), "its weights do not match the shapes config.json gives", "restore the config the model was saved with") from None


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


GENERATED_README = "<!-- written by surgeon: replaced by the model card `surgeon push` builds -->"


def write_adapter_modules(model: Any, folder: Path) -> None:
    """Beside a peft adapter: the surgeon modules trained with it (``surgeon-modules.safetensors``,
    settings in ``surgeon-modules.json``), which ``load_model(folder)`` attaches to the base model
    before the adapter; and a README.md that says so (plain ``PeftModel.from_pretrained`` loads the
    adapter without them), in place of peft's blank template."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = {n.split(f"{modeling.MODULE_ATTR}.", 1)[1]: p for n, p in module_parameters(base).items()}
    if not params:
        return
    write_file(folder / ADAPTER_MODULES, {k: p.detach().contiguous().cpu() for k, p in params.items()}, {"format": "pt"})
    sections = getattr(base.config, modeling.CONFIG_KEY, None) or {}
    (folder / ADAPTER_SETTINGS).write_text(json.dumps(sections, indent=2) + "\n")
    kinds = " and ".join({"iada": "IADA blocks", "image_lora": "Image-LoRA adapters"}.get(k, k) for k in sections)
    (folder / "README.md").write_text(
        f"{GENERATED_README}\n# LoRA adapter with surgeon modules\n\n"
        f"This folder holds a peft LoRA adapter and the {kinds} trained with it ({ADAPTER_MODULES}).\n"
        "Load both with surgeon:\n\n```python\nimport surgeon\n\n"
        'model = surgeon.load_model("PATH")   # the base model, its surgeon modules, then the adapter\n```\n\n'
        f"`PeftModel.from_pretrained` alone loads the adapter but not the {kinds}: the model would compute something else.\n"
    )


def module_shard(kind: str) -> str:
    """The file that holds one module kind's tensors in a model folder (``surgeon-iada.safetensors``)."""
    return f"{modeling.MODULE_ATTR}-{kind}.safetensors"


def write_module_folder(model: Any, source: Any, folder: Path) -> dict[str, list[str]]:
    """Write ``source`` (the ``Checkpoint`` the model was loaded from) plus ``model``'s surgeon
    modules into an existing ``folder``, without rewriting the base weights: the weight files are
    hard-linked (copied across filesystems), each module kind's tensors go to its own shard
    (``module_shard(kind)``) listed in ``model.safetensors.index.json``, and config.json gets the
    modules' settings, ``auto_map`` and the remote code. For runs that trained surgeon modules only.

    Surgeon tensors already in ``source`` are left out of the index. (A linked file may still hold
    old ones; transformers reads the index's files in sorted order, and the ``surgeon-*`` shards
    sort after the base weight files, so the new tensors win.) Returns the files linked, copied
    and skipped."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in module_parameters(base).items():
        shards.setdefault(module_shard(name.split(".")[1]), {})[name] = p.detach().contiguous().cpu()
    return write_beside(source, folder, shards, type(base).__name__, getattr(base.config, modeling.CONFIG_KEY, None) or {})


def write_beside(source: Any, folder: Path, shards: dict[str, dict[str, torch.Tensor]], architecture: str, sections: dict) -> dict[str, list[str]]:
    """The one module-folder writer: ``source``'s files carried into ``folder`` (weights hard-linked,
    the rest copied), ``shards`` (file -> surgeon tensors) written and indexed beside them, and
    config.json with ``sections`` under ``"surgeon"``, ``auto_map`` for ``architecture`` and the
    remote code. Surgeon tensors already in ``source`` leave the index. Returns the files linked,
    copied and skipped."""
    prefix = modeling.MODULE_ATTR + "."
    weight_map = {name: info.file for name, info in source.tensors.items() if not name.startswith(prefix)}
    total = sum(info.nbytes for name, info in source.tensors.items() if name in weight_map)
    files: dict[str, list[str]] = {"linked": [], "copied": [], "skipped": []}
    rewritten = {"config.json", INDEX_NAME, RECORD_NAME, "README.md", modeling.MODELING_FILE, *shards}  # the base's card is not this folder's
    rename = indexed_names(set(weight_map.values()))
    carry_files(source.path, folder, set(weight_map.values()), files, rewritten, rename)
    weight_map = {name: rename.get(file, file) for name, file in weight_map.items()}
    for shard, tensors in shards.items():
        write_file(folder / shard, tensors, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    write_index(folder / INDEX_NAME, weight_map, total)
    (folder / "config.json").write_text(json.dumps(source.config, indent=2) + "\n")
    modeling.write_remote_code(folder, architecture, sections)
    return files


def indexed_names(weight_files: set[str]) -> dict[str, str]:
    """Renames for base weight files carried into a folder that gets an index: a lone
    ``model.safetensors`` becomes ``model-00001-of-00001.safetensors``, because transformers loads
    ``model.safetensors`` in preference to an index beside it (and would never read the extra shards)."""
    single = "model.safetensors"
    return {single: "model-00001-of-00001.safetensors"} if single in weight_files else {}


def carry_files(
    src: Path, dst: Path, weight_files: set[str], files: dict[str, list[str]], rewritten: set[str],
    rename: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Link the weight files still in use (under ``rename``d names), copy the other top-level files
    (tokenizer, processor, generation config); skip pickles, sub-folders, unused weight files and
    the ``rewritten`` names."""
    rename = rename or {}
    for path in sorted(Path(src).iterdir()):
        name = path.name
        if name in rewritten:
            continue
        weights = name.endswith(".safetensors")
        if path.is_dir() or path.suffix in PICKLE_SUFFIXES or (weights and name not in weight_files):
            files["skipped"].append(name)
        elif weights:
            files["linked" if link_or_copy(path, dst / rename.get(name, name)) == "link" else "copied"].append(name)
        else:
            shutil.copy2(path, dst / name)
            files["copied"].append(name)


def _load_adapter(path: Path, **kwargs: Any) -> Any:
    """A peft adapter folder: its base model, the surgeon modules saved beside it, the adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file

    settings = json.loads((path / "adapter_config.json").read_text())
    base_path = settings.get("base_model_name_or_path")
    if not base_path:
        raise ConfigError("model", f"{path}/adapter_config.json names no base model", "set base_model_name_or_path in it")
    from surgeon.hub.repo_ids import REPO_ID

    if not Path(base_path).exists() and not REPO_ID.match(base_path):
        raise ConfigError(
            "model",
            f"the adapter's base model {base_path} (base_model_name_or_path in {path}/adapter_config.json) is not found",
            "set it to the base model's folder or Hub id",
        )
    if settings.get("revision") and "revision" not in kwargs and not Path(base_path).exists():
        kwargs = {**kwargs, "revision": settings["revision"]}
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
    with peft_quietly():
        return PeftModel.from_pretrained(model, str(path))


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing``: keep its FutureWarning
    out of the user's output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_eval_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> Any:
    """``load_model`` for inference (probes, diagnostics): in eval mode on ``device``.

    ``device``: ``auto`` (the first GPU if there is one, else the CPU), ``cpu``, ``cuda[:N]``.
    ``dtype``: ``auto`` (the checkpoint's on a GPU, float32 on the CPU), or a dtype (``surgeon.dtypes``).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError("device", f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA is not available on this machine", "use cpu (or auto)")
    from surgeon import dtypes

    chosen: Any = dtypes.torch_name(dtype) if dtype != "auto" else ("auto" if kind != "cpu" else "float32")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = load_model(path, dtype=chosen if chosen == "auto" else getattr(torch, chosen))
    except (OSError, ValueError) as exc:
        problem = f"cannot load the model ({' '.join(str(exc).split())[:200]})"
        raise CheckpointError(str(path), problem, "give a transformers model folder or Hub repo id") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()
