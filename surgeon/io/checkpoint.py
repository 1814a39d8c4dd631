"""Checkpoints: a local folder or a Hub repo id, read one tensor at a time.

    ckpt = open_checkpoint("Qwen/Qwen2.5-VL-7B-Instruct")       # or a local folder
    ckpt.tensors["lm_head.weight"].shape                         # names, shapes, dtypes: no data read
    w = ckpt.read("model.layers.0.mlp.up_proj.weight")           # one tensor, fresh CPU memory

Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``) checkpoints are
read; pickle-only checkpoints (``pytorch_model.bin``, ``*.pt``) are refused and never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from surgeon.errors import CheckpointError
from surgeon.io.header import FormatError, TensorInfo, parse_header, read_header
from surgeon.io.paths import special_kind

if TYPE_CHECKING:  # torch is imported when a tensor is read: opening and inspecting need only headers
    import torch

INDEX_NAME = "model.safetensors.index.json"
IDENTITY_SAMPLES = 64  # reads per weight file in ``Checkpoint.identity``
MAX_CONFIG_BYTES = 64 * 10**6  # config.json holds sizes and names; anything larger is not one
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")



_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".qweight", ".scales", ".qzeros", ".SCB")


class Checkpoint:
    """An opened checkpoint folder. Cheap to create: only headers and JSON are read.

    Attributes:
        path: the local folder (a Hub snapshot folder for repo ids).
        source: what the user gave (path or repo id), recorded as is in ``surgeon.json``.
        revision: the revision asked for (repo ids only).
        commit: the resolved commit hash (repo ids only).
        config: ``config.json`` as a dict (empty when the folder has none).
        tensors: every tensor's ``TensorInfo``, in file and data order.
        files: the safetensors files, in order.
    """

    def __init__(
        self, path: Path, source: str | None = None, revision: str | None = None, commit: str | None = None,
        headers: dict[str, tuple[bytes, int | None]] | None = None,
    ):  # fmt: skip
        self.path = Path(path)
        self.source = source if source is not None else str(path)
        self.revision = revision
        self.commit = commit
        self.headers_only = headers is not None  # the weights are not here: names, shapes and dtypes only
        self._headers = headers or {}
        self._handles: dict[str, BinaryIO] = {}
        self._lock = threading.Lock()
        self.config = self._load_config()
        self.files, self.tensors, self.index_metadata = self._scan()

    # ----------------------------------------------------------------- discovery
    def _load_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        kind = special_kind(cfg)
        if kind or cfg.stat().st_size > MAX_CONFIG_BYTES:
            problem = f"is {kind}" if kind else f"is {cfg.stat().st_size / 1e6:.0f} MB, too large for a config"
            raise CheckpointError(self.source, f"config.json {problem}", "restore the file from the original model")
        try:
            data = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(self.source, f"config.json is not valid JSON ({e})", "restore the file from the original model") from None
        if not isinstance(data, dict):
            raise CheckpointError(self.source, "config.json is not a JSON object", "restore the file from the original model")
        return data

    def _scan(self) -> tuple[list[str], dict[str, TensorInfo], dict]:
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                data = json.loads(index.read_text())
                weight_map: dict[str, str] = data["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(self.source, f"{INDEX_NAME} is not a valid index", "restore it from the original model") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (f in self._headers if self.headers_only else (self.path / f).is_file())]
            if missing:
                raise CheckpointError(
                    self.source,
                    f"{INDEX_NAME} names {len(missing)} shard(s) that are missing, e.g. {missing[0]}",
                    "download the missing shards again",
                )
            metadata = data.get("metadata") or {}
        else:
            files = sorted(self._headers) if self.headers_only else sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map, metadata = {}, {}
        if not files:
            self._raise_no_weights()
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            try:
                found, _ = parse_header(*self._headers[name], name) if self.headers_only else read_header(self.path / name, name)
            except FormatError as e:
                raise CheckpointError(self.source, f"{name} {e}", "download or copy this file again") from None
            except OSError as e:
                raise CheckpointError(self.source, f"cannot read {name} ({e.strerror})", "check the file's permissions") from None
            for t, info in found.items():
                if weight_map and weight_map.get(t) != name:
                    continue  # stray tensors in a shard the index does not point to
                tensors[t] = info
        absent = [t for t in weight_map if t not in tensors]
        if absent:
            raise CheckpointError(
                self.source,
                f"{INDEX_NAME} lists {len(absent)} tensor(s) missing from their shard, e.g. {absent[0]}",
                "download the shards again",
            )
        return files, tensors, metadata

    def _raise_no_weights(self) -> None:
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                self.source,
                f"holds only pickle weights ({', '.join(pickles[:3])}); surgeon never unpickles files",
                "convert the checkpoint to safetensors with a tool you trust, or use a safetensors revision",
            )
        raise CheckpointError(
            self.source, "has no safetensors weights (no *.safetensors files)", "point at a model folder that holds model.safetensors"
        )

    # ----------------------------------------------------------------- reading
    def read(self, name: str, rows: int | None = None, start: int = 0) -> torch.Tensor:
        """Read one tensor, or ``rows`` of its rows from row ``start`` on (default: the first
        ``rows``), into fresh CPU memory in its stored dtype."""
        from surgeon.io.safetensors import read_tensor

        info = self.tensors[name]
        try:
            return read_tensor(self.handle(info.file), info, rows, start)
        except FormatError as e:
            raise CheckpointError(self.source, f"{info.file} {e}", "download or copy this file again") from None

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Fill ``out`` (contiguous, stored dtype) with rows ``start .. start + len(out)`` of a
        tensor: the allocation-free read that block streaming uses."""
        from surgeon.io.safetensors import read_into

        info = self.tensors[name]
        try:
            return read_into(self.handle(info.file), info, out, start)
        except FormatError as e:
            raise CheckpointError(self.source, f"{info.file} {e}", "download or copy this file again") from None

    def handle(self, file: str) -> BinaryIO:
        """The open binary handle of one of ``files`` (opened once, closed by ``close()``)."""
        if self.headers_only:
            raise CheckpointError(self.source, "was opened for its headers only", "open it with open_checkpoint(source) to read weights")
        with self._lock:  # block streaming reads on background threads
            f = self._handles.get(file)
            if f is None:
                f = self._handles[file] = open(self.path / file, "rb")
            return f

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, in on-disk order (sequential reads)."""
        wanted = self.tensors if names is None else set(names)
        for name in self.tensors:
            if name in wanted:
                yield name, self.read(name)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- identity
    @property
    def dtype(self) -> str:
        """The dtype code most parameters are stored in (e.g. ``"BF16"``)."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
        return max(counts, key=counts.__getitem__)

    @property
    def quantization(self) -> str | None:
        """The quantization method (``"fp8"``, ``"bitsandbytes"`` …) when the weights are stored
        quantized: a ``quantization_config`` in config.json, or 8-bit/4-bit tensors with scales."""
        for cfg in (self.config, *(v for v in self.config.values() if isinstance(v, dict))):
            quant = cfg.get("quantization_config")
            if isinstance(quant, dict):
                return str(quant.get("quant_method") or "unknown method")
        for info in self.tensors.values():
            if info.dtype.startswith("F8") or info.name.endswith(_SCALE_SUFFIXES):
                return "fp8" if info.dtype.startswith("F8") else "unknown method"
        return None

    def fingerprint(self) -> str:
        """A content hash of config.json and every tensor's name, dtype, shape and byte range.

        It changes when the architecture or any stored tensor's layout changes; it does not read
        tensor data, so it is instant on any size of model.
        """
        h = hashlib.sha256()
        cfg = self.path / "config.json"
        if cfg.exists():
            h.update(cfg.read_bytes())
        for info in self.tensors.values():
            h.update(f"{info.name}|{info.dtype}|{info.shape}|{info.file}|{info.start}|{info.end}\n".encode())
        return "sha256:" + h.hexdigest()

    def identity(self) -> str:
        """What the weights are, cheaply: the commit of a Hub snapshot; for a local folder the
        ``fingerprint`` plus each file's size and a hash of ``IDENTITY_SAMPLES`` reads of 4 KiB
        spread over its tensor data (a fine-tuned copy of a model differs almost everywhere, so
        the samples tell it apart without reading the weights)."""
        if self.commit:
            return f"commit:{self.commit}"
        h = hashlib.sha256(self.fingerprint().encode())
        for file in self.files:
            path = self.path / file
            size = path.stat().st_size
            h.update(f"{file}|{size}\n".encode())
            with open(path, "rb") as f:
                for k in range(IDENTITY_SAMPLES):
                    f.seek(size * k // IDENTITY_SAMPLES)
                    h.update(f.read(4096))
        return "sha256:" + h.hexdigest()

    def describe(self) -> dict:
        """How this input is recorded in ``surgeon.json``: as given, plus revision or content hash."""
        out: dict[str, str] = {"source": self.source}
        if self.commit:
            out["revision"] = self.revision or "main"
            out["commit"] = self.commit
        out["fingerprint"] = self.fingerprint()
        from surgeon.io.provenance import card_license

        if not self.headers_only and (license_ := card_license(self.path)):
            out["license"] = license_
        return out

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self.tensors)} tensors in {len(self.files)} file(s))"
