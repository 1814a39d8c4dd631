"""Quantized checkpoints read as the values they stand for, one tensor (or row block) at a time.

    scheme = quant_scheme(ckpt)            # None for a plain checkpoint; torch-free
    view = dequantized(ckpt)               # ckpt itself when plain
    w = view.read("model.layers.0.mlp.up_proj.weight")   # fp32: the stored values times their scales

The formats read (docs/methods.md §9):

- block FP8 (DeepSeek-V3, Qwen3 ``-FP8``): ``quantization_config.quant_method: fp8`` with
  ``weight_block_size: [B0, B1]``; ``X.weight`` in float8 and ``X.weight_scale_inv`` of shape
  [⌈out/B0⌉, ⌈in/B1⌉]: value = fp8 × scale of its block. Without a block size the scale is per
  tensor (one number) or per output row.
- compressed-tensors (``quant_method: compressed-tensors``): ``float-quantized`` FP8 and
  ``int-quantized``/``naive-quantized`` int8 (``X.weight`` with ``X.weight_scale``), and
  ``pack-quantized`` INT4/INT8 (``X.weight_packed`` int32 words, ``X.weight_scale``,
  ``X.weight_shape``, and ``X.weight_zero_point`` packed along the rows when asymmetric):
  value = (q − zero) × scale, per tensor, per output row, per group of ``group_size`` inputs or per
  ``block_structure`` block, as the config's groups say.
- FBGEMM FP8 (``fbgemm_fp8``): per-row ``X.weight_scale``.

What is not quantized (``ignore`` lists: lm_head, vision towers, router gates) is read as stored.
Activation scales (``input_scale`` …) are not weights and are hidden. GPTQ, AWQ, bitsandbytes
and other methods are refused in one line, as are float8 weights without a scale and scales whose
shape does not fit their weight.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from surgeon.errors import CheckpointError
from surgeon.io.header import TensorInfo

if TYPE_CHECKING:
    import torch

READABLE = ("fp8", "compressed-tensors", "fbgemm_fp8")
_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
_HIDDEN = re.compile(r"\.(input_scale|output_scale|k_scale|v_scale|input_zero_point|weight_global_scale|input_global_scale)$")
_COMPANIONS = ("_scale_inv", "_scale", "_zero_point", "_shape", "_g_idx")
FP8_MAX = 448.0  # the largest float8_e4m3fn value


@dataclass(frozen=True)
class Grid:
    """How scales tile a weight: one scale per ``rows`` × ``cols`` cell."""

    rows: int
    cols: int

    def shape(self, out: int, inp: int) -> tuple[int, int]:
        return (math.ceil(out / self.rows), math.ceil(inp / self.cols))

    def describe(self, out: int, inp: int) -> str:
        if (self.rows, self.cols) == (out, inp):
            return "per tensor"
        if self.rows == 1 and self.cols == inp:
            return "per output row"
        if self.rows == 1:
            return f"groups of {self.cols}"
        return f"blocks of {self.rows}×{self.cols}"


@dataclass(frozen=True)
class QuantTensor:
    """One quantized weight: where its stored parts are and how they combine."""

    name: str  # the logical name (``X.weight``)
    stored: str  # the stored values (``X.weight`` or ``X.weight_packed``)
    scale: str
    shape: tuple[int, int]  # logical [out, in]
    grid: Grid
    bits: int  # 8 for float8 and int8, 4 for int4
    kind: str  # "float" or "int"
    packed: bool = False
    zero: str | None = None  # zero points (asymmetric), packed along rows when ``packed``


@dataclass(frozen=True)
class Scheme:
    """A checkpoint's quantization: method, format, block/group sizes and the tensors it covers."""

    method: str
    format: str
    tensors: dict[str, QuantTensor]
    hidden: tuple[str, ...]  # stored names that are parts of quantized weights or activation scales
    logical_dtype: str  # the dtype code of the unquantized model (config ``dtype``), BF16 when unknown
    ignore: tuple[str, ...] = ()

    def describe(self) -> str:
        grids = sorted({q.grid.describe(*q.shape) for q in self.tensors.values()})
        kinds = sorted({f"{'fp' if q.kind == 'float' else 'int'}{q.bits}" for q in self.tensors.values()})
        return f"{self.method} ({self.format}: {', '.join(kinds)}, {', '.join(grids)})"

    def to_dict(self) -> dict[str, Any]:
        grids = sorted({q.grid.describe(*q.shape) for q in self.tensors.values()})
        return {"method": self.method, "format": self.format, "scales": grids, "quantized_tensors": len(self.tensors),
                "bits": sorted({q.bits for q in self.tensors.values()}), "ignore": list(self.ignore)}  # fmt: skip


def quantization_config(config: dict) -> dict | None:
    for cfg in (config, *(v for v in config.values() if isinstance(v, dict))):
        quant = cfg.get("quantization_config")
        if isinstance(quant, dict):
            return quant
    return None


def quant_scheme(ckpt: Any) -> Scheme | None:
    """The checkpoint's quantization (None when its weights are stored plain). CheckpointError for
    a method surgeon cannot read, float8/int weights without scales, or mis-shaped scales."""
    quant = quantization_config(ckpt.config)
    stored_low = [i.name for i in ckpt.tensors.values() if i.dtype.startswith("F8")]
    if quant is None:
        if not stored_low and not any(n.endswith((".weight_scale_inv", ".weight_packed")) for n in ckpt.tensors):
            return None
        quant = {"quant_method": "fp8"}  # float8 weights without a config: read them only with their scales
    method = str(quant.get("quant_method") or "unknown")
    if method not in READABLE:
        raise CheckpointError(
            ckpt.source, f"holds {method} quantized weights, which surgeon does not read",
            "use the model's BF16 release, or one quantized as FP8 or with compressed-tensors",
        )  # fmt: skip
    fmt, candidates, ignore = _format_and_grids(ckpt, quant, method)
    tensors: dict[str, QuantTensor] = {}
    hidden: list[str] = [n for n in ckpt.tensors if _HIDDEN.search(n)]
    for name, info in ckpt.tensors.items():
        q = _quant_tensor(ckpt, name, info, method, candidates)
        if q is not None:
            tensors[q.name] = q
            hidden += [n for n in (q.stored, q.scale, q.zero, q.name.removesuffix(".weight") + ".weight_shape") if n and n != q.name]
    claimed = set(hidden) | {q.stored for q in tensors.values()}
    for name, info in ckpt.tensors.items():
        if name in claimed:
            continue
        if info.dtype.startswith("F8") or name.endswith(_COMPANIONS) or name.endswith(".weight_packed"):
            what = "is float8 but has no scale" if info.dtype.startswith("F8") else "has no weight it belongs to"
            raise CheckpointError(ckpt.source, f"tensor {name} {what}", "download the checkpoint again; its files do not go together")
    if not tensors:
        raise CheckpointError(ckpt.source, f"says its weights are quantized ({method}) but no tensor has scales", "check config.json's quantization_config")
    return Scheme(method, fmt, tensors, tuple(sorted(set(hidden) - set(tensors))), _logical_dtype(ckpt.config), ignore)


def _format_and_grids(ckpt: Any, quant: dict, method: str) -> tuple[str, list[tuple[str, Any]], tuple[str, ...]]:
    """The format name, the scale grids the config allows (as ``(strategy, size)``), the ignore list."""
    ignore = tuple(str(x) for x in (quant.get("ignore") or quant.get("modules_to_not_convert") or ()))
    if method == "fp8":
        block = quant.get("weight_block_size")
        if block is not None and (not isinstance(block, list | tuple) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(ckpt.source, f"has weight_block_size {block!r} in quantization_config, not two positive sizes", "fix config.json")
        return (f"float8 blocks {block[0]}×{block[1]}" if block else "float8"), ([("block", tuple(block))] if block else []), ignore
    if method == "fbgemm_fp8":
        return "float8 per row", [], ignore
    fmt = str(quant.get("format") or "")
    groups = quant.get("config_groups") or {}
    formats = {fmt} | {str(g.get("format")) for g in groups.values() if isinstance(g, dict) and g.get("format")}
    formats.discard("")
    bad = sorted(f for f in formats if f not in _FORMATS)
    if bad or not formats:
        raise CheckpointError(
            ckpt.source, f"uses the compressed-tensors format {', '.join(bad) or 'none named'}, which surgeon does not read",
            f"surgeon reads {', '.join(_FORMATS)}; use the model's BF16 release",
        )  # fmt: skip
    grids: list[tuple[str, Any]] = []
    for group in groups.values():
        weights = (group or {}).get("weights") or {}
        strategy = weights.get("strategy")
        if strategy == "group" and weights.get("group_size"):
            grids.append(("group", int(weights["group_size"])))
        elif strategy == "block" and weights.get("block_structure"):
            grids.append(("block", tuple(int(b) for b in weights["block_structure"])))
        if weights.get("actorder") not in (None, False, "static"):
            raise CheckpointError(ckpt.source, f"uses activation ordering ({weights['actorder']}), which surgeon does not undo", "use a checkpoint quantized without actorder")
    return ",".join(sorted(formats)), grids, ignore


def _grid_for(scale_shape: tuple[int, ...], out: int, inp: int, candidates: list[tuple[str, Any]]) -> Grid | None:
    if math.prod(scale_shape) == 1:
        return Grid(out, inp)
    options = [Grid(1, inp)]
    for strategy, size in candidates:
        options.append(Grid(1, size) if strategy == "group" else Grid(*size))
    squeezed = tuple(scale_shape) if len(scale_shape) == 2 else (scale_shape[0], 1) if len(scale_shape) == 1 else ()
    return next((g for g in options if g.shape(out, inp) == squeezed), None)


def _quant_tensor(ckpt: Any, name: str, info: TensorInfo, method: str, candidates: list[tuple[str, Any]]) -> QuantTensor | None:
    tensors = ckpt.tensors
    if name.endswith(".weight_packed"):
        base = name.removesuffix("_packed")
        scale = base + "_scale"
        if scale not in tensors:
            raise CheckpointError(ckpt.source, f"tensor {name} has no scale ({scale})", "download the checkpoint again")
        bits = _packed_bits(ckpt, scale)
        shape = _packed_shape(ckpt, base, info, bits)
        zero = base + "_zero_point" if base + "_zero_point" in tensors else None
        return _checked(ckpt, QuantTensor(base, name, scale, shape, _grid(ckpt, scale, shape, candidates), bits, "int", True, zero))
    if not name.endswith(".weight") or len(info.shape) != 2:
        return None
    scale = next((name + s for s in ("_scale_inv", "_scale") if name + s in tensors), None)
    if scale is None:
        return None
    if info.dtype.startswith("F8"):
        kind, bits = "float", 8
    elif info.dtype == "I8":
        kind, bits = "int", 8
    else:
        raise CheckpointError(ckpt.source, f"tensor {name} is stored as {info.dtype} beside a scale ({scale})", "surgeon reads float8 or int8 weights with scales")
    shape = (info.shape[0], info.shape[1])
    zero = name + "_zero_point" if name + "_zero_point" in tensors else None
    return _checked(ckpt, QuantTensor(name, name, scale, shape, _grid(ckpt, scale, shape, candidates), bits, kind, False, zero))


def _grid(ckpt: Any, scale: str, shape: tuple[int, int], candidates: list[tuple[str, Any]]) -> Grid:
    found = _grid_for(tuple(ckpt.tensors[scale].shape), *shape, candidates)
    if found is None:
        sizes = ", ".join(f"{s} {v}" for s, v in candidates) or "none in the config"
        raise CheckpointError(
            ckpt.source, f"scale {scale} has shape {list(ckpt.tensors[scale].shape)}, which fits no scale layout of its "
            f"{shape[0]}×{shape[1]} weight (block/group sizes: {sizes})", "check config.json's quantization_config against the files",
        )  # fmt: skip
    return found


def _checked(ckpt: Any, q: QuantTensor) -> QuantTensor:
    if q.zero is not None and not q.packed and tuple(ckpt.tensors[q.zero].shape) != tuple(ckpt.tensors[q.scale].shape):
        raise CheckpointError(ckpt.source, f"zero points {q.zero} do not match the shape of {q.scale}", "download the checkpoint again")
    return q


def _packed_bits(ckpt: Any, scale: str) -> int:
    quant = quantization_config(ckpt.config) or {}
    bits = {int((g.get("weights") or {}).get("num_bits", 4)) for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)}
    bits = bits or {4}
    if len(bits) != 1 or next(iter(bits)) not in (2, 4, 8):
        raise CheckpointError(ckpt.source, f"packs weights with {sorted(bits)} bits, which surgeon does not unpack", "surgeon unpacks 2-, 4- and 8-bit packed weights")
    return next(iter(bits))


def _packed_shape(ckpt: Any, base: str, packed: TensorInfo, bits: int) -> tuple[int, int]:
    """The logical [out, in] of a packed weight: its ``weight_shape`` tensor (16 bytes read), or,
    for a checkpoint opened for its headers only, the packed width times the values per word."""
    info = ckpt.tensors.get(base + "_shape")
    if info is not None and not getattr(ckpt, "headers_only", False) and info.numel == 2 and info.dtype in ("I64", "I32"):
        with open(ckpt.path / info.file, "rb") as f:
            f.seek(info.start)
            raw = f.read(info.nbytes)
        values = struct.unpack("<2q" if info.dtype == "I64" else "<2i", raw)
        if values[0] != packed.shape[0] or math.ceil(values[1] * bits / 32) != packed.shape[1]:
            raise CheckpointError(ckpt.source, f"{base}_shape says {list(values)}, which does not fit {packed.name} {list(packed.shape)}", "download the checkpoint again")
        return (int(values[0]), int(values[1]))
    return (packed.shape[0], packed.shape[1] * (32 // bits))


_FLOAT_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _logical_dtype(config: dict) -> str:
    text = (config.get("text_config") or {}) if isinstance(config.get("text_config"), dict) else {}
    for value in (config.get("dtype"), config.get("torch_dtype"), text.get("dtype"), text.get("torch_dtype")):
        code = _FLOAT_CODES.get(str(value).removeprefix("torch."))
        if code:
            return code
    return "BF16"


# ---------------------------------------------------------------------------------- reading


def unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Signed values from int32 words along the last axis: value k of a word sits at bits
    k·bits … (k+1)·bits − 1, stored with an offset of 2^(bits−1) (compressed-tensors' packing)."""
    import torch

    per = 32 // bits
    wide = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    values = (wide.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)[..., :count] - (1 << (bits - 1))


def dequantize_rows(ckpt: Any, q: QuantTensor, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``start .. stop`` of ``q``'s values in fp32 (into ``out`` when given)."""
    import torch

    inp = q.shape[1]
    g = q.grid
    r0, r1 = start // g.rows, max((stop - 1) // g.rows + 1, start // g.rows)
    stored = ckpt.read(q.stored, stop - start, start)
    if q.packed:
        stored = unpack_int32(stored, q.bits, inp)
    values = out.view(stop - start, inp) if out is not None else torch.empty(stop - start, inp)
    if stored.dtype == torch.float8_e4m3fn:
        _e4m3_to_float(stored, values)
    else:
        values.copy_(stored)
    if math.prod(ckpt.tensors[q.scale].shape) == 1:
        scale = ckpt.read(q.scale).float().reshape(1, 1)
        if q.zero is None:
            return values.mul_(float(scale))
    else:
        scale = ckpt.read(q.scale, r1 - r0, r0).float().reshape(r1 - r0, -1)
    zero = _zero_points(ckpt, q)[r0:r1].float() if q.zero is not None else None
    per_row = (torch.arange(start, stop) // g.rows - r0) if g.rows > 1 else None
    if per_row is not None:  # one scale row per block of rows: repeated for the rows read (small)
        scale = scale.index_select(0, per_row)
        zero = zero.index_select(0, per_row) if zero is not None else None
    if inp % g.cols == 0 and scale.shape[0] == stop - start:  # the usual case: cells tile the row exactly
        cells = values.view(stop - start, inp // g.cols, g.cols)
        if zero is not None:
            cells.sub_(zero.unsqueeze(-1))
        return cells.mul_(scale.unsqueeze(-1)).view(stop - start, inp)
    cols = torch.arange(inp) // g.cols
    rows = slice(None) if scale.shape[0] == stop - start else [0] * (stop - start)
    if zero is not None:
        values.sub_(zero[rows][:, cols])
    return values.mul_(scale[rows][:, cols])


def _e4m3_to_float(codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes into fp32, exactly, twice as fast as torch's own cast on the CPU: the
    sign and the 7 exponent-and-mantissa bits moved into a float16 (exponent bias 15 for 7) is
    the value times 2⁻⁸, subnormals included."""
    import torch

    u = codes.view(torch.uint8).to(torch.int16)
    half = ((u & 0x80) << 8).bitwise_or_((u & 0x7F) << 7)
    return out.copy_(half.view(torch.float16)).mul_(256.0)


def _zero_points(ckpt: Any, q: QuantTensor) -> torch.Tensor:
    grid = q.grid.shape(*q.shape)
    raw = ckpt.read(q.zero)
    if q.packed:  # packed along the rows: unpack the transposed words
        return unpack_int32(raw.reshape(-1, grid[1]).t(), q.bits, grid[0]).t()
    return raw.reshape(grid)


class Dequantized:
    """A quantized checkpoint read as its values: ``tensors`` lists the logical tensors (quantized
    weights as fp32 of their logical shape; scales and packing parts hidden), ``read`` and
    ``read_into`` return values, ``dtype`` is the unquantized model's dtype. Everything else
    (path, source, identity, handles) is the wrapped checkpoint's."""

    def __init__(self, ckpt: Any, scheme: Scheme) -> None:
        self._ckpt = ckpt
        self.scheme = scheme
        self.quantized = scheme.tensors
        hidden = set(scheme.hidden)
        by_stored = {q.stored: q for q in scheme.tensors.values()}  # (one pass: MoE checkpoints hold 10⁵ tensors)
        tensors: dict[str, TensorInfo] = {}
        for name, info in ckpt.tensors.items():
            q = by_stored.get(name)
            if q is not None:
                tensors[q.name] = replace(info, name=q.name, dtype="F32", shape=q.shape)
            elif name not in hidden:
                tensors[name] = info
        self.tensors = tensors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ckpt, name)

    @property
    def dtype(self) -> str:
        return self.scheme.logical_dtype

    @property
    def stored(self) -> Any:
        """The checkpoint as stored."""
        return self._ckpt

    def read(self, name: str, rows: int | None = None, start: int = 0) -> torch.Tensor:
        q = self.quantized.get(name)
        if q is None:
            return self._ckpt.read(name, rows, start)
        stop = q.shape[0] if rows is None else min(start + rows, q.shape[0])
        return dequantize_rows(self._ckpt, q, start, stop)

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        q = self.quantized.get(name)
        if q is None:
            return self._ckpt.read_into(name, out, start)
        dequantize_rows(self._ckpt, q, start, start + out.shape[0], out)
        return out


def dequantized(ckpt: Any) -> Any:
    """``ckpt`` read as values: a ``Dequantized`` view when it is quantized, else ``ckpt``."""
    if isinstance(ckpt, Dequantized):
        return ckpt
    cached = vars(ckpt).get("_dequantized")  # one scan per opened checkpoint (align runs once per pairing); never a wrapped one's
    if cached is None:
        scheme = quant_scheme(ckpt)
        cached = ckpt if scheme is None else Dequantized(ckpt, scheme)
        ckpt._dequantized = cached
    return cached
