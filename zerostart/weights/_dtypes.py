"""safetensors dtype names <-> torch dtypes."""

from __future__ import annotations

import torch

from zerostart.names import dtype_name
from zerostart.weights._errors import WeightsError

_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64",
    "I64": "int64", "U64": "uint64", "C64": "complex64", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
TORCH_DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _NAMES.items() if hasattr(torch, v)}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def to_torch(name: str, where: str = "") -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise WeightsError(f"{where}dtype {name} has no torch equivalent in torch {torch.__version__}") from None


def parse_dtype(dtype: "str | torch.dtype | None") -> torch.dtype | None:
    """Accept a torch dtype, its name ('bfloat16', 'torch.float32') or a safetensors name ('BF16')."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    s = str(dtype).removeprefix("torch.")
    if s in TORCH_DTYPES:
        return TORCH_DTYPES[s]
    try:
        s = dtype_name(s)  # the engine's dtypes and their aliases (zerostart.names)
    except ValueError:
        pass  # any other torch dtype by its name ('float64', 'int8')
    dt = getattr(torch, s, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (try float32, bfloat16 or float16)")
    return dt
