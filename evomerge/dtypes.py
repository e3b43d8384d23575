"""The one table of dtypes: recipe names, torch dtypes, safetensors codes and their sizes.

Example:
    >>> canonical("bf16"), code_of(torch_dtype("float16")), itemsize("BF16")
    ('bfloat16', 'F16', 2)
"""

from __future__ import annotations

import torch

__all__ = ["ALIASES", "FLOATS", "canonical", "torch_dtype", "code_of", "name_of_code", "itemsize"]

# Names a recipe's `dtype:` accepts (mergekit's spellings), to the canonical float name.
ALIASES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float64": "float64",
}
FLOATS = ("float16", "bfloat16", "float32", "float64")

# (canonical name, torch dtype, safetensors code, bytes per element)
_TABLE = (
    ("float32", torch.float32, "F32", 4),
    ("float16", torch.float16, "F16", 2),
    ("bfloat16", torch.bfloat16, "BF16", 2),
    ("float64", torch.float64, "F64", 8),
    ("int64", torch.int64, "I64", 8),
    ("int32", torch.int32, "I32", 4),
    ("int8", torch.int8, "I8", 1),
    ("uint8", torch.uint8, "U8", 1),
    ("bool", torch.bool, "BOOL", 1),
)
_BY_NAME = {r[0]: r for r in _TABLE}
_BY_TORCH = {r[1]: r for r in _TABLE}
_BY_CODE = {r[2]: r for r in _TABLE}
_BY_TORCH_STR = {str(r[1]): r for r in _TABLE}


def canonical(name: str) -> str | None:
    """The canonical float name of a recipe's dtype spelling, or None when it is not one."""
    return ALIASES.get(name)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a canonical name (``float32``...)."""
    return _BY_NAME[name][1]


def code_of(dtype: torch.dtype | str) -> str:
    """The safetensors code (``BF16``...) of a torch dtype, of its string form, or of a code."""
    if isinstance(dtype, torch.dtype):
        return _BY_TORCH[dtype][2]
    row = _BY_TORCH_STR.get(dtype) or _BY_CODE.get(dtype)
    return row[2] if row else dtype


def name_of_code(code: str) -> str | None:
    """The canonical float name of a safetensors code, or None for non-float codes."""
    row = _BY_CODE.get(code)
    return row[0] if row and row[0] in FLOATS else None


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors code (4 when unknown)."""
    row = _BY_CODE.get(code)
    return row[3] if row else 4
