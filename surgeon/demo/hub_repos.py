"""What the local Hub stand-in (``surgeon.demo.hub_standin``) keeps: repositories with branches,
commits and the files of every commit, the requests it received, and the model-card metadata
checks the Hub's ``/api/validate-yaml`` makes."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import yaml

from surgeon.hub.repo_ids import REPO_ID

# The Hub's accepted values (subset that matters for model cards).
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a regular file (what the Hub reports as ``oid`` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    """One request as it arrived."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    endpoint: str = ""  # which endpoint handled it ("create", "commit", …, or "unknown")


@dataclass
class Commit:
    oid: str
    branch: str
    summary: str
    description: str
    changed: list[str]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> files then


def validate_card_yaml(content: str) -> list[str]:
    """The metadata errors the Hub's ``/api/validate-yaml`` would report for a README.md."""
    match = re.match(r"^\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", content, re.S)
    if not match:
        return []
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        return [f"YAML cannot be parsed: {e}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["metadata must be a mapping"]
    errors = []
    base = data.get("base_model")
    bases = [base] if isinstance(base, str) else base
    if base is not None and not (isinstance(bases, list) and all(isinstance(b, str) and REPO_ID.match(b) for b in bases)):
        errors.append(f'"base_model" must be a model id or a list of model ids, got {base!r}')
    relation = data.get("base_model_relation")
    if relation is not None:
        if relation not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {", ".join(BASE_MODEL_RELATIONS)}, got {relation!r}')
        if base is None:
            errors.append('"base_model_relation" needs "base_model"')
    for key in ("tags", "datasets", "metrics", "language"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')
    for key in ("library_name", "pipeline_tag", "license", "model_name"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    return errors
