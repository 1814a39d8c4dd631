"""The exact copy of a folder that ``surgeon push`` sends, checked whole for credentials, local
paths and links that leave the folder.

    plan = plan_upload(folder, card_text, record, token)     # reads, never writes
    plan.refused                                               # [(path, why)], empty when it may be sent
    with staged(folder, plan) as tmp:                          # links + rewritten files, in a temp dir
        client.upload_folder(folder_path=tmp, ...)

Policy (every entry under the folder, ``.git`` and ``.cache`` aside):

- **Links.** A symlink (file or folder) whose target lies outside the folder is refused by name;
  links inside the folder, and a Hub cache snapshot's links into its own ``blobs/``, are followed.
  Anything that is not a regular file (a pipe, a socket, a device) is refused.
- **Credentials.** A credential file (``.env*``, ``id_rsa``, ``*.pem``, ``.netrc``, ``credentials`` …)
  is refused by its name, and so is a file whose name holds a key. Every file is scanned, streamed,
  whatever its size, for the token in use and for the shapes of keys and tokens (Hub, ``sk-…``,
  ``AKIA…``, ``ghp_…``, private-key blocks …; ``surgeon.publish.secrets``), also as UTF-16/UTF-32
  text and behind JSON escapes. A safetensors file must be valid as a whole (its tensors tile its
  data exactly, nothing after the last one); its tensor data is binary and is skipped, its header
  (names and metadata) is scanned. ``allow`` (``--allow-file``) exempts the files it matches from
  the name and shape rules, never from the token in use. A refusal names the kind of key and its
  pattern, never the key.
- **Local paths.** No text file sends an absolute local path: a path under this folder, its parent,
  the home, working, temporary or Hugging Face cache folders, or any absolute path whose top
  folder exists on this machine outside the system ones (``/usr``, ``/etc`` …). surgeon's own
  records are cleaned in the uploaded copy instead: ``surgeon.json`` (and the ``surgeon`` section
  of ``heads.json``) name local inputs and outputs as ``local <name>`` (inputs keep their
  fingerprints), ``_name_or_path`` fields holding a local path are dropped, and a local
  ``base_model_name_or_path`` becomes the base model's Hub id, or a note naming the local folder. Vocabulary
  files (``tokenizer.json``, ``merges.txt`` …) are scanned for tokens only.
- The folder itself is never written: cleaned files and the card live in a staging folder under
  the system temp dir whose other entries are symlinks to the originals (no copy of the weights).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.publish.secrets import OVERLAP, Scanner, credential_file, find_secret, unescape
from surgeon.io.header import FormatError, parse_header, raw_header
from surgeon.io.provenance import is_local_path, local_name

CARD = "README.md"
# an absolute path of two or more parts (POSIX), a home-relative one, or a Windows drive path
_PATH = re.compile(rb"(?<![\w.~:/\\-])(/(?:[\w.@+~-]+/)+[\w.@+~-]*|~/[\w.@+~/-]+|[A-Za-z]:\\[\w.@+~ \\-]+)")
_SYSTEM_DIRS = {"usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "sys", "dev", "var", "opt", "boot", "run", "srv", "snap"}
_VOCAB = {"tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt", "vocab.txt"}
_RECORDS = {"surgeon.json": None, "heads.json": "surgeon"}  # file -> the key holding a surgeon record (None: all of it)
_DROP_KEYS = {"_name_or_path", "name_or_path", "model_name_or_path"}
_BASE_KEY = "base_model_name_or_path"
_SKIP_DIRS = {".git", ".cache"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class UploadPlan:
    """What would be sent: ``files`` (path in repo, bytes) sorted, the replaced contents, notes on
    what the uploaded copies change, and ``refused``: (path, problem) pairs that stop the push."""

    files: tuple[tuple[str, int], ...]
    replaced: dict[str, bytes] = field(default_factory=dict)  # path in repo -> bytes sent instead
    notes: tuple[str, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def local_files(folder: Path) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Every file under ``folder`` by posix path relative to it (``.git``/``.cache`` skipped), and
    the entries refused: links that leave the folder, and anything that is not a regular file."""
    folder = Path(folder)
    real = Path(os.path.realpath(folder))
    allowed = [real]
    if real.parent.name == "snapshots":  # a Hub cache snapshot: its files link into ../../blobs
        allowed.append(real.parent.parent / "blobs")
    out: dict[str, Path] = {}
    refused: list[tuple[str, str]] = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        keep = []
        for d in sorted(dirs):
            path = base / d
            if base == folder and d in _SKIP_DIRS:
                continue
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not _inside(target, allowed):
                    refused.append((rel + "/", f"is a link to {target}, a folder outside the one pushed"))
                continue  # a link inside the folder: its files are sent under their own path
            keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if not _inside(target, allowed):
                    refused.append((rel, f"is a link to {target}, outside the folder pushed"))
                    continue
            try:
                mode = os.stat(path).st_mode
            except OSError:
                refused.append((rel, "is a broken link"))
                continue
            if not stat.S_ISREG(mode):
                refused.append((rel, "is not a regular file"))
                continue
            out[rel] = path
    return dict(sorted(out.items())), refused


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def local_base_note(name: str) -> str:
    """What an uploaded adapter names as its base when the base was a local folder: a note that
    peft's AutoPeftModel shows in its error, never a bare name that could resolve to another repo."""
    return f"local model folder {name} (not on the Hub): load it yourself, then PeftModel.from_pretrained(base, this repo)"


def plan_upload(
    folder: Path, card: str | None, record: dict | None, token: str | None, hub_base: str | None = None, allow: tuple[str, ...] = ()
) -> UploadPlan:
    """Check every file that would be sent and decide the cleaned copies. Reads only; never raises
    for what it finds (``refused`` lists it).

    ``card``: README.md text to send instead of the folder's (None keeps the folder's).
    ``hub_base``: the base model's Hub id, for a local ``base_model_name_or_path`` (None: a note
    naming the local folder is sent instead). ``allow``: glob patterns (on the path inside the folder, or its
    name) of files the user means to publish although they look like credentials.
    """
    folder = Path(folder)
    files, refused = local_files(folder)
    roots = local_roots(folder, record)
    secret = token.encode() if token and len(token) >= 8 else None
    replaced: dict[str, bytes] = {}
    notes: list[str] = []
    if card is not None:
        replaced[CARD] = card.encode()
    for rel, path in files.items():
        if rel in replaced:
            continue
        name = Path(rel).name
        if rel in _RECORDS or (name.endswith(".json") and name not in _VOCAB):
            cleaned = _clean_json(rel, path, roots, hub_base, notes)
            if cleaned is not None:
                replaced[rel] = cleaned
    for rel in sorted(set(files) | set(replaced)):
        problem = _check_file(rel, replaced.get(rel), files.get(rel), secret, roots, allowed(rel, allow))
        if problem:
            refused.append((rel, problem))
    sizes = {rel: path.stat().st_size for rel, path in files.items()}
    sizes.update({rel: len(data) for rel, data in replaced.items()})
    return UploadPlan(tuple(sorted(sizes.items())), replaced, tuple(notes), tuple(sorted(refused)))


@contextmanager
def staged(folder: Path, plan: UploadPlan) -> Iterator[Path]:
    """A temporary folder holding what ``plan`` sends: symlinks to the originals, real replaced files."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix="surgeon-push-"))
    try:
        for rel, _ in plan.files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel in plan.replaced:
                dst.write_bytes(plan.replaced[rel])
            else:
                dst.symlink_to(os.path.realpath(folder / rel))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- scanning


def allowed(rel: str, allow: tuple[str, ...]) -> bool:
    """Whether ``--allow-file`` patterns match the path ``rel`` (or its file name)."""
    import fnmatch

    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(Path(rel).name, p) for p in allow)


def _check_file(
    rel: str, data: bytes | None, path: Path | None, secret: bytes | None, roots: list[bytes], allow: bool = False
) -> str | None:
    """The first problem of one file as it would be sent (``data`` when replaced), or None."""
    name = Path(rel).name
    if not allow:
        kind = credential_file(rel)
        if kind:
            return f"is {kind}, which would publish a credential (--allow-file {name} if you mean to)"
        kind = find_secret(rel.encode())
        if kind:
            return f"has a name that holds what looks like {kind}"
    scanner = Scanner(secret, shapes=not allow)
    if data is None and path is not None and name.endswith(".safetensors"):
        try:
            head = raw_header(path)
            parse_header(head, path.stat().st_size, name)  # valid as a whole: nothing hidden after the tensors
        except FormatError as e:
            return f"is not a valid safetensors file: it {e}"
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        return _scan(iter([head]), scanner, roots, paths=True)
    if data is not None:
        return _scan(iter([data]), scanner, roots, paths=name not in _VOCAB)
    encoding = text_encoding(path)  # type: ignore[arg-type]
    if encoding != "utf-8":  # binary, or UTF-16/32 text: the raw bytes first (keys in them are seen with NULs removed)
        problem = _scan(_read_chunks(path), scanner, [], paths=False)  # type: ignore[arg-type]
        if problem or encoding is None:
            return problem
        scanner = Scanner(secret, shapes=not allow)
    return _scan(_decoded(path, encoding), scanner, roots, paths=name not in _VOCAB)  # type: ignore[arg-type]


def _scan(chunks: Iterator[bytes], scanner: Scanner, roots: list[bytes], paths: bool) -> str | None:
    tail = b""
    for chunk in chunks:
        kind = scanner.feed(chunk)
        if kind:
            return f"holds what looks like {kind}, which would be published"
        if paths:
            window = tail + chunk
            escaped = b"\\/" in window or b"\\u00" in window or b"\\x" in window  # a path written behind JSON escapes
            hit = _local_path(window, roots) or (_local_path(unescape(window), roots) if escaped else None)
            if hit:
                return f"holds the local path {hit!r}, which would be published"
            tail = window[-OVERLAP:]
    return None


def _local_path(text: bytes, roots: list[bytes]) -> str | None:
    """The first absolute local path in ``text``: under one of ``roots``, or whose top folder
    exists here and is not a system folder."""
    for m in _PATH.finditer(text):
        value = m.group(1)
        if any(value == r or value.startswith(r + b"/") or value.startswith(r + b"\\") for r in roots):
            return value.decode(errors="replace")
        if value.startswith(b"/"):
            top = value.split(b"/")[1].decode(errors="replace")
            if top and top not in _SYSTEM_DIRS and os.path.isdir("/" + top):
                return value.decode(errors="replace")
        elif value.startswith(b"~/"):
            return value.decode(errors="replace")
    return None


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


_PRINTABLE = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def text_encoding(path: Path) -> str | None:
    """How a file's text is encoded (``utf-8``, ``utf-16-le`` …), or None for binary: a byte-order
    mark says so, else UTF-16/32 whose ASCII leaves NUL bytes in fixed places; other text has no
    NUL byte in its first 8 KB (git's rule)."""
    with open(path, "rb") as f:
        head = f.read(8192)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if b"\0" not in head:
        return "utf-8"
    for width, order in ((4, "le"), (4, "be"), (2, "le"), (2, "be")):
        body = head[: len(head) - len(head) % width]
        units = [body[i : i + width] for i in range(0, len(body), width)]
        if len(units) >= 4:  # ASCII text: the low byte printable, the others NUL, in (nearly) every unit
            text = sum(
                (u[1:] if order == "le" else u[:-1]) == b"\0" * (width - 1) and (u[0] if order == "le" else u[-1]) in _PRINTABLE
                for u in units
            )
            if text >= 0.9 * len(units):
                return f"utf-{8 * width}-{order}"
    return None


def _decoded(path: Path, encoding: str) -> Iterator[bytes]:
    """A text file's chunks as UTF-8 (undecodable bytes replaced)."""
    import codecs

    if encoding == "utf-8":
        yield from _read_chunks(path)
        return
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    for chunk in _read_chunks(path):
        yield decoder.decode(chunk).encode()
    yield decoder.decode(b"", final=True).encode()


def local_roots(folder: Path, record: dict | None = None) -> list[bytes]:
    """Absolute local folders whose paths must not leave the machine: the folder, its parent, the
    home, working, temporary and Hugging Face cache folders, and the folders of local inputs."""
    candidates = [Path(folder).absolute(), Path(folder).absolute().parent, Path.home(), Path.cwd(), Path(tempfile.gettempdir())]
    for env in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]).expanduser())
    for value in _record_strings(record):
        if is_local_path(value):
            candidates.append(Path(value).expanduser().parent)
    roots: set[str] = set()
    for p in candidates:
        for q in (p, Path(os.path.realpath(p))):
            if len(q.parts) > 1:
                roots.add(str(q))
    return sorted((r.encode() for r in roots), key=len, reverse=True)


def _record_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _record_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _record_strings(v)


# ---------------------------------------------------------------------------- cleaning


def _clean_json(rel: str, path: Path, roots: list[bytes], hub_base: str | None, notes: list[str]) -> bytes | None:
    """Cleaned bytes for a JSON file (a surgeon record's local paths as ``local <name>``, local
    ``_name_or_path`` fields dropped, a local base replaced), or None when nothing changes."""
    try:
        if path.stat().st_size > 100 * 10**6:
            return None
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    changed = False
    record_key = _RECORDS.get(rel, "") if rel in _RECORDS else ""
    decoded = [r.decode() for r in roots]

    def local(value: Any) -> bool:
        return isinstance(value, str) and (is_local_path(value) or any(value.startswith(r + "/") for r in decoded))

    def clean_record(value: Any) -> Any:
        nonlocal changed
        if local(value):
            changed = True
            return local_name(value)
        if isinstance(value, str):
            for r in decoded:
                if r in value:
                    changed = True
                    value = re.sub(re.escape(r) + r"[/\\]?[^\s\"'`),;]*", lambda m: local_name(m.group(0)), value)
            return value
        if isinstance(value, dict):
            return {k: clean_record(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean_record(v) for v in value]
        return value

    def walk(value: Any, where: str) -> Any:
        nonlocal changed
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                key_where = f"{where}.{k}" if where else str(k)
                if k in _DROP_KEYS and local(v):
                    notes.append(f"{rel}: dropped {key_where} (a local path)")
                    changed = True
                    continue
                if k == _BASE_KEY and local(v):
                    replacement = hub_base if hub_base and not local(hub_base) else local_base_note(Path(v).name)
                    notes.append(f"{rel}: {key_where} set to \"{replacement}\" (was a local path)")
                    out[k] = replacement
                    changed = True
                    continue
                out[k] = walk(v, key_where)
            return out
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    if rel in _RECORDS and record_key is None:
        cleaned = clean_record(data)
        if changed:
            notes.append(f"{rel}: local paths written as `local <name>`")
    elif rel in _RECORDS and isinstance(data, dict) and record_key in data:
        cleaned = {**data, record_key: clean_record(data[record_key])}
        if changed:
            notes.append(f"{rel}: local paths in {record_key!r} written as `local <name>`")
    else:
        cleaned = walk(data, "")
    if not changed:
        return None
    return (json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n").encode()
