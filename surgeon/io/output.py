"""Output folders that appear complete or not at all, and a streaming sharded safetensors writer.

    with output_folder("merged/", overwrite=False) as tmp:          # a hidden sibling folder
        with ShardedWriter(tmp, specs, shard_size=5 * 10**9) as w:  # headers planned up front
            for name, tensor in compute():                           # one tensor in memory at a time
                w.write(name, tensor)
    # only now does "merged/" exist; an exception (or a kill) leaves no folder named "merged/"

The writer knows every tensor's name, dtype and shape before any data arrives, so each shard's
header is written first and tensor bytes are streamed to their offsets: peak memory is one
tensor, not one shard. ``write_rows`` writes a tensor block by block (peak memory: one block) and
``copy_raw`` copies a tensor's bytes unchanged from an input file without passing through memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from surgeon.errors import ConfigError, OutputBusyError, OutputExistsError
from surgeon.io.header import DTYPE_SIZES, header_bytes
from surgeon.io.safetensors import DTYPE_CODES, DTYPES, tensor_bytes

DEFAULT_SHARD_SIZE = 5 * 10**9
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int, field: str = "shard_size") -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912, ``1000`` -> 1000."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(field, f"cannot read {text!r} as a size", "write it like 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(field, "must be positive")
    return value


NAME_MAX = 255  # bytes in one file name on the file systems surgeon writes to (ext4, xfs, btrfs, NFS)
MADE_MARK = ".surgeon-made"
_LONGEST_TAG = len("tmp-shared-00000000")  # the longest tag ``sibling`` is given  # a file surgeon writes into a folder it makes and may remove later


def absolute(path: str | Path) -> Path:
    """``path`` made absolute without following links (``.`` and ``..`` resolved as written)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def name_limit(folder: Path) -> int:
    """The longest file name, in bytes, that ``folder``'s file system takes."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


def sibling(final: Path, tag: str) -> Path:
    """The hidden sibling ``.<name>.surgeon-<tag>`` of ``final`` (temporary folders, the lock); for a
    name so long that it would pass the file system's limit, ``.<hash of the name>.surgeon-<tag>``."""
    stem = f".{final.name}.surgeon-"
    if len(stem.encode()) + _LONGEST_TAG > name_limit(final.parent if final.parent.exists() else Path("/")):
        import hashlib

        stem = f".{hashlib.sha256(final.name.encode()).hexdigest()[:16]}.surgeon-"
    return final.parent / (stem + tag)


def check_name(path: str | Path, field: str = "output", extra: str = "") -> None:
    """ConfigError when the last part of ``path`` (plus ``extra``, e.g. ``-checkpoints``) is longer
    than the file system takes."""
    final = absolute(path)
    parent = next((p for p in (final.parent, *final.parent.parents) if p.exists()), Path("/"))
    size, limit = len((final.name + extra).encode()), name_limit(parent)
    if size > limit:
        shown = final.name if len(final.name) <= 40 else final.name[:20] + "…" + final.name[-12:]
        what = f"the name {shown}{extra}" + (" (the folder beside the output that the run needs)" if extra else "")
        raise ConfigError(field, f"{what} is {size} bytes, over the file system's limit of {limit}", f"choose a name of at most {limit - len(extra.encode())} bytes")


def check_removable(path: str | Path, field: str = "output") -> None:
    """ConfigError for an output that would replace the current folder, a folder holding it, the
    home folder or the root: surgeon never renames a folder away from under its user."""
    final = absolute(path)
    cwd = absolute(os.getcwd())
    if final == cwd or final in cwd.parents:
        relation = "is the current folder" if final == cwd else "holds the current folder"
        raise ConfigError(field, f"{path} {relation}, which an output would replace", "give a new folder for the output, e.g. -o ./out")
    if final == absolute(Path.home()) or final.parent == final:
        raise ConfigError(field, f"{path} is {'the home folder' if final.parent != final else 'the root folder'}", "give a new folder for the output")


def mark_made(folder: Path, kind: str) -> None:
    """Record in ``folder`` that surgeon made it (``remove_made`` removes only such folders)."""
    (Path(folder) / MADE_MARK).write_text(json.dumps({"made_by": "surgeon", "kind": kind}) + "\n")


def made_by_surgeon(folder: Path, kind: str) -> bool:
    """Whether ``folder`` holds the mark ``mark_made(folder, kind)`` wrote."""
    try:
        return json.loads((Path(folder) / MADE_MARK).read_text()).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        return False


def check_output(path: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Raise OutputExistsError for an existing non-empty output unless ``overwrite``; ConfigError
    for an output that is, lies inside, or contains one of the local ``inputs`` (with
    ``--overwrite`` it would replace the input; surgeon never edits its inputs), that is or holds
    the current folder, or whose name (or its temporary siblings') the file system cannot take."""
    p = absolute(path)
    check_name(p)
    check_removable(p)
    check_apart(path, inputs)
    if p.exists() and not p.is_dir():
        raise ConfigError("output", f"{path} exists and is a file", "give a folder path for the output")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputExistsError(str(path))


def check_apart(path: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """ConfigError if output ``path`` is, lies inside, or contains a local input (a folder or file)."""
    out = Path(os.path.realpath(absolute(path)))
    for given in inputs:
        if given is None or not str(given) or not Path(given).exists():
            continue  # a Hub repo id, or nothing
        inp = Path(given).resolve()
        relation = "is" if out == inp else "is inside" if inp in out.parents else "contains" if out in inp.parents else None
        if relation:
            raise ConfigError("output", f"{path} {relation} the input {given}", "choose an output outside the inputs")


_HELD: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth): locks this process holds
_log = logging.getLogger("surgeon.io.output")


@contextmanager
def claim(path: str | Path) -> Iterator[None]:
    """Hold the exclusive claim on output ``path`` for the duration: an advisory lock on the
    hidden file ``.<name>.surgeon-lock`` beside it (released by the system when the process ends,
    however it ends). A second run writing the same output fails at once with OutputBusyError;
    the same process may claim it again (nested). Temporary folders of earlier runs for this
    output, whose owners are gone since they no longer hold the claim, are removed (and logged)."""
    import fcntl

    final = absolute(path)
    check_name(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = str(sibling(final, "lock"))
    if lock in _HELD:
        fd, depth = _HELD[lock]
        _HELD[lock] = (fd, depth + 1)
        try:
            yield
        finally:
            _HELD[lock] = (fd, _HELD[lock][1] - 1)
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputBusyError(str(path), owner) from None
        try:  # the file may have been removed and made anew while we waited: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[lock] = (fd, 1)
    try:
        _remove_stale(final)
        yield
    finally:
        _HELD.pop(lock, None)
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


_STALE = re.compile(r"\.surgeon-(tmp|old)-[0-9a-f]{8}")


def _remove_stale(final: Path) -> None:
    """Remove the temporary (and superseded) folders that killed runs left for ``final``: only
    the names surgeon gives them (``.<name>.surgeon-tmp-<8 hex>``, ``….surgeon-old-<8 hex>``)."""
    prefixes = {sibling(final, "").name}
    for stale in sorted(final.parent.glob(".*.surgeon-*")):
        head, sep, tail = stale.name.rpartition(".surgeon-")
        if head + sep not in prefixes or not _STALE.fullmatch(sep + tail) or stale.is_symlink() or not stale.is_dir():
            continue
        size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file())
        shutil.rmtree(stale, ignore_errors=True)
        _log.warning(f"removed {stale.name} ({size / 1e6:.1f} MB), left in {final.parent} by an interrupted run for {final.name}")


@contextmanager
def output_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``path`` only when the block succeeds. The
    output is claimed (``claim``) for the whole block, so no other run can write it meanwhile."""
    final = absolute(path)
    with claim(final):
        check_output(final, overwrite)
        tmp = sibling(final, f"tmp-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            old = sibling(final, f"old-{secrets.token_hex(4)}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor that will be written: name, safetensors dtype code (``"BF16"``), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def plan_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Greedy shard plan in the given order; a tensor larger than ``shard_size`` gets its own shard."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_names(count: int, prefix: str = "model", always_index: bool = False) -> list[str]:
    if count == 1 and not always_index:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Stream a planned set of tensors into safetensors shards plus ``<prefix>.safetensors.index.json``.

    Tensors may be written in any order; each must match its spec's shape, and is cast to the
    spec's dtype. ``close()`` fails if any planned tensor was not written. A single shard is
    written as ``<prefix>.safetensors`` without an index unless ``always_index``.
    """

    def __init__(
        self,
        folder: Path,
        specs: list[TensorSpec],
        shard_size: int = DEFAULT_SHARD_SIZE,
        prefix: str = "model",
        always_index: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        plan = plan_shards(specs, shard_size)
        self.files = shard_names(len(plan), prefix, always_index)
        self._handles: list[BinaryIO] = []
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}
        self._written: set[str] = set()
        self._filled: dict[str, int] = {}
        self._cast_buffers: dict[torch.dtype, torch.Tensor] = {}
        self.total_size = sum(s.nbytes for s in specs)
        for i, (fname, shard) in enumerate(zip(self.files, plan)):
            head, offsets = header_bytes([(s.name, s.dtype, s.shape) for s in shard], {"format": "pt"})
            f = open(self.folder / fname, "wb")
            f.write(head)
            f.truncate(len(head) + sum(s.nbytes for s in shard))
            self._handles.append(f)
            for spec, off in zip(shard, offsets):
                if spec.name in self._where:
                    raise ValueError(f"tensor {spec.name!r} planned twice")
                self._where[spec.name] = (i, len(head) + off, spec)
        self.single = len(self.files) == 1 and not always_index

    def dtype(self, name: str) -> torch.dtype:
        """The dtype a planned tensor is written in."""
        return DTYPES[self._where[name][2].dtype]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (cast to its planned dtype)."""
        spec = self._where[name][2]
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: planned shape {spec.shape}, got {tuple(tensor.shape)}")
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows ``start .. start + len(rows)`` of a planned tensor (cast to its dtype).

        Lets a large tensor be produced block by block; the tensor counts as written once every
        one of its bytes has been written.
        """
        shard, offset, spec = self._where[name]
        if spec.shape:
            if tuple(rows.shape[1:]) != spec.shape[1:] or start < 0 or start + rows.shape[0] > spec.shape[0]:
                raise ValueError(f"{name}: rows {start}..{start + rows.shape[0]} of shape {tuple(rows.shape)} do not fit {spec.shape}")
            offset += start * (spec.nbytes // spec.shape[0] if spec.shape[0] else 0)
        elif tuple(rows.shape) != ():
            raise ValueError(f"{name}: planned shape (), got {tuple(rows.shape)}")
        if DTYPE_CODES.get(rows.dtype) != spec.dtype:
            rows = self._cast(rows, DTYPES[spec.dtype])
        data = tensor_bytes(rows)
        f = self._handles[shard]
        f.seek(offset)
        f.write(data)
        self._count(name, len(data), spec)

    def _cast(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``rows`` in ``dtype``, through one reused buffer per dtype (no allocation per block);
        a whole large tensor is converted into a fresh one instead of growing the buffer."""
        if rows.numel() > 1 << 24:
            return rows.to(dtype)
        flat = self._cast_buffers.get(dtype)
        if flat is None or flat.numel() < rows.numel():
            flat = self._cast_buffers[dtype] = torch.empty(max(rows.numel(), 1), dtype=dtype)
        out = flat[: rows.numel()].view(rows.shape)
        out.copy_(rows)
        return out

    def copy_raw(self, name: str, src: BinaryIO, start: int) -> None:
        """Copy a tensor's bytes unchanged from an open safetensors file, where they begin at byte
        ``start`` (its ``TensorInfo.start``). The planned dtype must be the stored one; the copy
        happens in the kernel where it can (``copy_file_range``), never through a tensor."""
        shard, offset, spec = self._where[name]
        f = self._handles[shard]
        f.flush()
        remaining, src_pos, dst_pos = spec.nbytes, start, offset
        while remaining:
            try:
                n = os.copy_file_range(src.fileno(), f.fileno(), min(remaining, 1 << 30), src_pos, dst_pos)
            except OSError:
                n = self._copy_chunk(src, f, src_pos, dst_pos, min(remaining, 1 << 26))
            if n <= 0:
                raise OSError(f"unexpected end of input while copying {name}")
            remaining, src_pos, dst_pos = remaining - n, src_pos + n, dst_pos + n
        self._count(name, spec.nbytes, spec)

    @staticmethod
    def _copy_chunk(src: BinaryIO, dst: BinaryIO, src_pos: int, dst_pos: int, size: int) -> int:
        data = os.pread(src.fileno(), size, src_pos)  # positional: safe while another thread reads src
        return os.pwrite(dst.fileno(), data, dst_pos)

    def _count(self, name: str, nbytes: int, spec: TensorSpec) -> None:
        done = self._filled.get(name, 0) + nbytes
        self._filled[name] = done
        if done >= spec.nbytes:
            self._written.add(name)

    def weight_map(self) -> dict[str, str]:
        return {name: self.files[shard] for name, (shard, _, _) in self._where.items()}

    def close(self) -> None:
        missing = [n for n in self._where if n not in self._written]
        for f in self._handles:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._handles.clear()
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")
        if not self.single:
            write_index(self.folder / f"{self.prefix}.safetensors.index.json", self.weight_map(), self.total_size)

    def abort(self) -> None:
        for f in self._handles:
            f.close()
        self._handles.clear()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write a ``*.safetensors.index.json`` in the layout transformers reads."""
    data = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(data, indent=2) + "\n")


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` when both are on one filesystem, else copy. Returns which.

    A symlink (the Hub cache's snapshot files are relative links into ``blobs/``) is followed:
    the file it points to is linked or copied, never the link itself."""
    src = Path(os.path.realpath(src))
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"
