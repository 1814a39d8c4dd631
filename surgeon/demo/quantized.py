"""Quantized copies of a model folder, in the layouts released checkpoints use (for tests and
benchmarks: nothing can be downloaded here).

    save_fp8(src, dst, block=(128, 128))                  # DeepSeek-V3 / Qwen3-FP8: weight_scale_inv per block
    save_compressed(src, dst, bits=4, group=32)           # compressed-tensors pack-quantized INT4 (Kimi-K2)

Only the 2-D weights of the language model's decoder layers are quantized (as released models do:
embeddings, lm_head, norms, the vision tower and router gates stay as stored). Each tensor is
read, quantized and written on its own.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from surgeon.io.safetensors import write_file

FP8_MAX = 448.0


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return (len(shape) == 2 and ".layers." in name and name.endswith("_proj.weight") and "visual" not in name
            and "vision" not in name and not name.endswith("mlp.gate.weight"))  # fmt: skip


def _copy_side_files(src: Path, dst: Path, quantization: dict) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def _tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn values and fp32 scales per ``block`` (scale = max|w| / 448), as DeepSeek's
    weight_quant does."""
    out, inp = w.shape
    rows, cols = math.ceil(out / block[0]), math.ceil(inp / block[1])
    scale = torch.ones(rows, cols)
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            cell = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].float()
            amax = float(cell.abs().max())
            s = amax / FP8_MAX if amax > 0 else 1.0
            scale[i, j] = s
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (cell / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def save_fp8(src: str | Path, dst: str | Path, block: tuple[int, int] | None = (128, 128)) -> Path:
    """A block FP8 copy (``quant_method: fp8``, ``weight_block_size``); ``block=None``: one scale per tensor."""
    src, dst = Path(src), Path(dst)
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if block:
        quantization["weight_block_size"] = list(block)
    _copy_side_files(src, dst, quantization)
    tensors = {}
    for name, w in _tensors(src).items():
        if _quantizable(name, tuple(w.shape)):
            q, scale = fp8_block(w, block or tuple(w.shape))  # type: ignore[arg-type]
            tensors[name], tensors[name + "_scale_inv"] = q, scale if block else scale.reshape(())
        else:
            tensors[name] = w
    write_file(dst / "model.safetensors", tensors, {"format": "pt"})
    return dst


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit integers packed along the last axis into int32 words, value k of a
    word at bits k·bits…, offset by 2^(bits−1) (compressed-tensors' layout), written out word by word."""
    per = 32 // bits
    unsigned = (values.to(torch.int64) + (1 << (bits - 1))).tolist()
    words = []
    for row in unsigned:
        packed_row = []
        for start in range(0, len(row), per):
            word = 0
            for k, v in enumerate(row[start : start + per]):
                word |= v << (bits * k)
            packed_row.append(word - (1 << 32) if word >= 1 << 31 else word)
        words.append(packed_row)
    return torch.tensor(words, dtype=torch.int32)


def save_compressed(
    src: str | Path, dst: str | Path, bits: int = 4, group: int = 32, symmetric: bool = True, fmt: str = "pack-quantized"
) -> Path:
    """A compressed-tensors copy: ``pack-quantized`` integers per group of ``group`` inputs (with
    packed zero points when not ``symmetric``), or ``float-quantized`` FP8 per output row."""
    src, dst = Path(src), Path(dst)
    floats = fmt == "float-quantized"
    weights = {"num_bits": 8 if floats else bits, "type": "float" if floats else "int", "symmetric": symmetric or floats,
               "strategy": "channel" if floats else "group", "group_size": None if floats else group}  # fmt: skip
    quantization = {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head", "re:.*visual.*"],
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}  # fmt: skip
    _copy_side_files(src, dst, quantization)
    tensors = {}
    for name, w in _tensors(src).items():
        if not _quantizable(name, tuple(w.shape)):
            tensors[name] = w
            continue
        w = w.float()
        if floats:
            scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
            tensors[name], tensors[name + "_scale"] = (w / scale).to(torch.float8_e4m3fn), scale
            continue
        out, inp = w.shape
        cells = math.ceil(inp / group)
        padded = torch.zeros(out, cells * group)
        padded[:, :inp] = w
        cell = padded.view(out, cells, group)
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if symmetric:
            scale = (cell.abs().amax(dim=2) / high).clamp(min=1e-8)
            zero = torch.zeros_like(scale, dtype=torch.int64)
        else:
            lo, hi = cell.amin(dim=2).clamp(max=0), cell.amax(dim=2).clamp(min=0)
            scale = ((hi - lo) / (high - low)).clamp(min=1e-8)
            zero = (low - torch.round(lo / scale)).clamp(low, high).to(torch.int64)
        q = (torch.round(cell / scale[..., None]) + zero[..., None]).clamp(low, high).view(out, -1)[:, :inp]
        base = name.removesuffix(".weight")
        tensors[base + ".weight_packed"] = pack_int32(q, bits)
        tensors[base + ".weight_scale"] = scale.to(torch.bfloat16)
        tensors[base + ".weight_shape"] = torch.tensor([out, inp], dtype=torch.int64)
        if not symmetric:
            tensors[base + ".weight_zero_point"] = pack_int32(zero.t(), bits).t().contiguous()
    write_file(dst / "model.safetensors", tensors, {"format": "pt"})
    return dst
