"""``surgeon.json``: how an output folder was made.

Written into every folder surgeon creates; ``surgeon push`` builds the model card from it::

    {"surgeon_version": "0.1.0", "command": "prior", "artifact": "prior",
     "methods": ["drift", "reasoning-prior"],
     "config": {...resolved options...},
     "inputs": {"vlm": {"source": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": "main", "commit": "…",
                        "fingerprint": "sha256:…"}, ...},
     "stats": {...what the command measured...},
     "created": "2026-11-22T10:00:00Z", "libraries": {"torch": "…", "transformers": "…"}}

Inputs are recorded as the user gave them (a repo id, or a path exactly as typed), never resolved
to absolute paths; no field that could hold a credential is ever written. Off this machine (model
cards, pushed records) a local path is shown as ``local <name>`` (``is_local_path``, ``local_name``).
Needs no torch: ``surgeon push`` reads records without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from surgeon.errors import CheckpointError

FILE_NAME = "surgeon.json"
_SECRET_KEYS = {"token", "hf_token", "password", "api_key"}


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if str(k).lower() not in _SECRET_KEYS}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": surgeon.json stays strict JSON
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# What an output folder holds; ``surgeon push`` writes the model card's loading snippet from it.
ARTIFACTS = (
    "prior",  # DRIFT reasoning prior: tensors under the VLM's names, not a loadable model
    "model",  # a complete model folder that plain transformers loads
    "model+remote-code",  # a model folder with surgeon modules, loaded with trust_remote_code=True
    "peft-adapter",  # a peft adapter folder (PeftModel.from_pretrained)
    "head-scores",  # Image-LoRA head scores and selection (heads.json)
    "evaluation",  # surgeon eval's report: results.jsonl, summary.json, tax.png
    "layer-probe",  # surgeon probe-layers: per-layer curves and a suggested range (surgeon.json, layers.png)
)
InputValue = Any  # a surgeon.io.checkpoint.Checkpoint (anything with ``describe()``), a dict or a list


def _describe(value: InputValue) -> Any:
    if callable(getattr(value, "describe", None)):
        return value.describe()
    if isinstance(value, list):
        return [_describe(v) for v in value]
    return _plain(value)


def card_license(folder: str | Path) -> str | None:
    """The ``license`` of a model folder's card (the YAML header of its README.md), or None."""
    try:
        text = (Path(folder) / "README.md").read_text(encoding="utf-8", errors="replace")[:65536]
    except OSError:
        return None
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return None
    import yaml

    try:
        header = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    value = header.get("license") if isinstance(header, dict) else None
    return str(value) if isinstance(value, (str, int)) and str(value).strip() else None


def file_hash(path: str | Path) -> str:
    """A short content hash of a data or settings file, for ``inputs`` entries (16 hex digits)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def build_record(
    command: str,
    artifact: str,
    config: Any,
    inputs: dict[str, InputValue],
    stats: dict | None = None,
    methods: list[str] | tuple[str, ...] | None = None,
) -> dict:
    """The ``surgeon.json`` content for one command run. ``artifact`` is one of ``ARTIFACTS``;
    ``inputs`` maps a role (``"vlm"``, ``"reasoning"`` …) to a checkpoint, a dict, or a list;
    ``methods`` names what the run applied (``drift``, ``lora``, ``ties`` …): the model card's tags
    and description are read from it, never inferred from settings (None: not recorded)."""
    from surgeon import __version__

    if artifact not in ARTIFACTS:
        raise ValueError(f"unknown artifact {artifact!r}")
    record = {
        "surgeon_version": __version__,
        "command": command,
        "artifact": artifact,
        "methods": None if methods is None else list(methods),
        "config": _plain(config),
        "inputs": {k: _describe(v) for k, v in inputs.items()},
        "stats": _plain(stats or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "libraries": {p: _version(p) for p in ("torch", "transformers", "safetensors", "peft")},
    }
    if methods is None:
        del record["methods"]
    return record


def write_record(folder: Path, record: dict) -> Path:
    path = Path(folder) / FILE_NAME
    path.write_text(json.dumps(_plain(record), indent=2, allow_nan=False) + "\n")
    return path


def read_record(folder: str | Path) -> dict | None:
    """The ``surgeon.json`` of a folder, or None when it has none; CheckpointError when it is not a
    JSON object."""
    path = Path(folder) / FILE_NAME
    if not path.exists():
        return None
    hint = "restore it from the run that made the folder, or delete it"
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(str(folder), f"{FILE_NAME} is not valid JSON ({e})", hint) from None
    if not isinstance(record, dict):
        raise CheckpointError(str(folder), f"{FILE_NAME} is not a JSON object", hint)
    return record


def is_local_path(value: str) -> bool:
    """Whether a string is an absolute local path (POSIX with two or more parts, ``~/…``, Windows)."""
    v = value.strip()
    if "\n" in v or len(v) > 4096:
        return False
    if re.match(r"^[A-Za-z]:[\\/]", v) or v.startswith("\\\\") or v.startswith("~/"):
        return True
    return v.startswith("/") and len([p for p in v.split("/") if p]) >= 2


def local_name(path: str) -> str:
    """How a local path is shown off this machine: ``local <name>`` (its last part)."""
    return f"local {Path(path.strip().replace(chr(92), '/')).name}"
