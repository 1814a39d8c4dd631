"""The exact copy of a folder that ``surgeon push`` sends, checked for credentials and local paths.

    plan = plan_upload(folder, card_text, record, token)     # reads, never writes
    with staged(folder, plan) as tmp:                          # links + rewritten files, in a temp dir
        client.upload_folder(folder_path=tmp, ...)

Invariants:

- The folder itself is never written: the card and any cleaned JSON file live only in the
  staging folder (elsewhere, under the system temp dir), whose other entries are symlinks to the
  originals, so a 100 GB checkpoint costs no copy.
- Nothing that looks like a Hub access token (``hf_…``, ``api_org_…``, or the token in use) is
  sent: text files, JSON files and safetensors header metadata are scanned; a hit is an error.
- No local absolute path that the user did not type is sent. Typed paths are the inputs' sources
  and option values recorded in ``surgeon.json``. ``_name_or_path`` fields holding a local path
  are dropped from the uploaded copy, a local ``base_model_name_or_path`` is replaced by the base
  model's Hub id when ``surgeon.json`` knows it; any other local path is an error naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.errors import CheckpointError

CARD = "README.md"
_TOKEN = re.compile(r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{30,}|api_org_[A-Za-z0-9]{30,})")
_TEXT_SUFFIXES = {".json", ".md", ".txt", ".py", ".yaml", ".yml", ".jinja", ".cfg", ".toml", ".csv", ".jsonl", ".ini", ".sh"}
_TEXT_MAX = 50 * 10**6
# JSON files whose every string value is checked; in others (tokenizer vocabularies, chat
# templates) only the path-holding keys are, because vocabularies legitimately hold "/usr"-like tokens.
_VOCAB_JSON = {"tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
_DROP_KEYS = {"_name_or_path", "name_or_path", "model_name_or_path"}
_BASE_KEY = "base_model_name_or_path"
_SKIP_DIRS = {".git", ".cache"}


@dataclass(frozen=True)
class UploadPlan:
    """What would be sent: ``files`` (path in repo, bytes) sorted, and the replaced contents."""

    files: tuple[tuple[str, int], ...]
    replaced: dict[str, bytes] = field(default_factory=dict)  # path in repo -> bytes sent instead
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def local_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by posix path relative to it (``.git``/``.cache`` skipped)."""
    out: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not (Path(root) == folder and d in _SKIP_DIRS))
        for name in files:
            path = Path(root) / name
            if path.is_file():
                out[path.relative_to(folder).as_posix()] = path
    return dict(sorted(out.items()))


def plan_upload(
    folder: Path, card: str | None, record: dict | None, token: str | None, hub_base: str | None = None
) -> UploadPlan:
    """Check every file that would be sent and decide the cleaned copies. Reads only.

    ``card``: README.md text to send instead of the folder's (None keeps the folder's).
    ``hub_base``: the base model's Hub id, used for a local ``base_model_name_or_path``.
    """
    folder = Path(folder)
    files = local_files(folder)
    typed = _typed_paths(record)
    roots = _local_roots(folder)
    secret = token if token and len(token) >= 8 else None
    replaced: dict[str, bytes] = {}
    notes: list[str] = []
    if card is not None:
        replaced[CARD] = card.encode()
    for rel in sorted(set(files) | set(replaced)):
        data, path = replaced.get(rel), files.get(rel, folder / rel)
        if path.suffix in _TEXT_SUFFIXES and (data is not None or path.stat().st_size <= _TEXT_MAX):
            text = (data if data is not None else path.read_bytes()).decode("utf-8", "replace")
            _check_token(rel, text, secret)
            if rel.endswith(".json") and data is None:
                cleaned = _clean_json(rel, text, typed, roots, hub_base, notes)
                if cleaned is not None:
                    replaced[rel] = cleaned
            elif rel == CARD:
                _check_roots(rel, text, roots, typed)
        elif path.suffix == ".safetensors":
            for key, value in _safetensors_metadata(path).items():
                _check_token(f"{rel} (header metadata {key!r})", value, secret)
                _check_value(f"{rel} (header metadata {key!r})", value, typed, roots)
    sizes = {rel: path.stat().st_size for rel, path in files.items()}
    sizes.update({rel: len(data) for rel, data in replaced.items()})
    return UploadPlan(tuple(sorted(sizes.items())), replaced, tuple(notes))


@contextmanager
def staged(folder: Path, plan: UploadPlan) -> Iterator[Path]:
    """A temporary folder holding what ``plan`` sends: symlinks to the originals, real replaced files."""
    folder = Path(folder).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="surgeon-push-"))
    try:
        for rel, _ in plan.files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel in plan.replaced:
                dst.write_bytes(plan.replaced[rel])
            else:
                dst.symlink_to((folder / rel).resolve())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- checks


def _check_token(where: str, text: str, secret: str | None) -> None:
    found = _TOKEN.search(text)
    if found or (secret and secret in text):
        shown = (found.group(1) if found else secret or "")[:7]
        raise CheckpointError(
            where,
            f"holds what looks like a Hub access token ({shown}…), which would be published",
            "remove it from the file and push again; surgeon push never uploads credentials",
        )


def _typed_paths(record: dict | None) -> set[str]:
    """Strings the user typed, as recorded in surgeon.json: input sources and option values."""
    typed: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            typed.add(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    if record:
        walk(record.get("config"))
        for entry in (record.get("inputs") or {}).values():
            for item in entry if isinstance(entry, list) else [entry]:
                if isinstance(item, dict):
                    walk(item.get("source"))
                else:
                    walk(item)
    return typed


def _local_roots(folder: Path) -> list[str]:
    """Absolute local folders whose paths must not appear in surgeon-written text."""
    candidates = [folder.resolve(), folder.resolve().parent, Path.home(), Path.cwd(), Path(tempfile.gettempdir())]
    for env in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]).expanduser())
    roots = {str(p) for p in candidates if len(p.parts) > 1}
    for p in list(roots):
        roots.add(str(Path(p).resolve()))
    return sorted(roots, key=len, reverse=True)


def _is_local_path(value: str) -> bool:
    v = value.strip()
    if "\n" in v or len(v) > 4096:
        return False
    if re.match(r"^[A-Za-z]:[\\/]", v) or v.startswith("\\\\"):
        return True
    if v.startswith("~/"):
        return True
    return v.startswith("/") and len([p for p in v.split("/") if p]) >= 2


def _contains_root(text: str, roots: list[str]) -> str | None:
    for root in roots:
        m = re.search(re.escape(root) + r"(?=$|[/\\\s\"'`),;:])", text)
        if m:
            end = re.search(r"[\s\"'`),;]", text[m.start() :])
            return text[m.start() : m.start() + (end.start() if end else len(text))]
    return None


def _check_value(where: str, value: str, typed: set[str], roots: list[str]) -> None:
    if value in typed:
        return
    hit = value if _is_local_path(value) else _contains_root(value, roots)
    if hit and hit not in typed:
        raise CheckpointError(
            where,
            f"holds the local path {hit!r}, which would be published",
            "remove it (or replace it with a Hub repo id) and push again",
        )


def _check_roots(where: str, text: str, roots: list[str], typed: set[str]) -> None:
    hit = _contains_root(text, roots)
    if hit and not any(hit.startswith(t) for t in typed if t):
        raise CheckpointError(
            where,
            f"holds the local path {hit!r}, which would be published",
            "remove it and push again, or pass --overwrite-card to send the card built from surgeon.json",
        )


def _clean_json(rel: str, text: str, typed: set[str], roots: list[str], hub_base: str | None, notes: list[str]) -> bytes | None:
    """Check a JSON file; return cleaned bytes when a path field was dropped or replaced, else None."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    changed = False
    every_value = Path(rel).name not in _VOCAB_JSON

    def walk(value: Any, where: str) -> Any:
        nonlocal changed
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                key_where = f"{where}.{k}" if where else str(k)
                if isinstance(v, str) and v not in typed and (_is_local_path(v) or _contains_root(v, roots)):
                    if k in _DROP_KEYS:
                        notes.append(f"{rel}: dropped {key_where} (a local path)")
                        changed = True
                        continue
                    if k == _BASE_KEY and hub_base:
                        notes.append(f"{rel}: {key_where} set to {hub_base} (was a local path)")
                        out[k] = hub_base
                        changed = True
                        continue
                    if every_value or k in _DROP_KEYS or k == _BASE_KEY:
                        _check_value(f"{rel} ({key_where})", v, typed, roots)
                out[k] = walk(v, key_where)
            return out
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = walk(data, "")
    if not changed:
        return None
    return (json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n").encode()


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors header (empty when unreadable)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 10**6:
                return {}
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
