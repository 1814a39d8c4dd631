"""The floating-point dtypes surgeon writes and computes in, under one vocabulary for every option.

    short("bfloat16")   -> "bf16"       # any spelling: bf16, bfloat16, BF16, torch.bfloat16
    torch_name("bf16")  -> "bfloat16"   # getattr(torch, …)
    code("bf16")        -> "BF16"       # the safetensors dtype code
    nbytes("float16")   -> 2

``--dtype`` (prior, score-heads, diagnose), ``--param-dtype`` and ``--mixed-precision`` (train)
accept every spelling below and speak of the short names. Torch-free.
"""

from __future__ import annotations

from surgeon.errors import ConfigError

SHORT = ("fp32", "bf16", "fp16")
_SPELLINGS = {
    "fp32": "fp32", "float32": "fp32", "f32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "f16": "fp16", "half": "fp16",
}  # fmt: skip
_TORCH = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_CODES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def short(value: object, field: str = "dtype", allowed: tuple[str, ...] = SHORT, extra: tuple[str, ...] = ()) -> str:
    """The short name (``bf16``) of any spelling of a dtype among ``allowed``, or one of ``extra``
    (``auto``, ``no``) as given; ConfigError naming the choices otherwise."""
    text = str(value).strip().lower().removeprefix("torch.")
    if text in extra:
        return text
    name = _SPELLINGS.get(text)
    if name is None or name not in allowed:
        raise ConfigError(field, f"unknown dtype {value!r}", f"choose one of {', '.join((*extra, *allowed))}")
    return name


def torch_name(value: str) -> str:
    """``float32``, ``bfloat16`` or ``float16`` for any spelling."""
    return _TORCH[short(value)]


def code(value: str) -> str:
    """The safetensors dtype code (``F32``, ``BF16``, ``F16``) for any spelling."""
    return _CODES[short(value)]


def from_code(value: str) -> str | None:
    """The short name of a safetensors dtype code, or None for one that is not a float surgeon writes."""
    return next((name for name, c in _CODES.items() if c == value), None)


def nbytes(value: str) -> int:
    """Bytes per element for any spelling."""
    return _BYTES[short(value)]
