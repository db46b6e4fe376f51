"""Quantized linear layers: the matmuls and lookups over weights held as small integers with
group scales (``zerostart.weights`` formats: int4 or int8, groups of 16 or 32).

    y = linear(x, qweight, scales, mins)        # x [M, K] -> [M, N]
    h = rows(ids, qweight, scales, mins, dtype)  # embedding lookup

The kernel follows the batch and the CPU (measured in ``bench/quant_kernels.py``):

| rows of x | CPU with AVX-512 (kernels built) | elsewhere |
| --- | --- | --- |
| <= DECODE_ROWS (decode) | ``qmm``: dequantized in registers, every row of x per group | dequantize, then ``F.linear`` |
| more (prefill) | ``dequant`` (the same kernel's unpacking), then ``F.linear`` | dequantize, then ``F.linear`` |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zerostart.engine._quant import _build
from zerostart.weights import dequantize

# at most this many rows run the in-register kernel; more are dequantized once and multiplied
# by BLAS (bench/quant_kernels.py: at 16 rows qmm is ahead, at 128 the dequantize+BLAS path is)
DECODE_ROWS = 32

__all__ = ["DECODE_ROWS", "kernel", "linear", "prepare", "rows"]


def prepare(device: torch.device) -> str:
    """Load the CPU kernels for a model on ``device`` (never builds); returns :func:`kernel`."""
    if device.type == "cpu":
        _build.load()
    return kernel(device)


def kernel(device: torch.device) -> str:
    """Which kernels quantized layers run on ``device``, in words (for logs and status)."""
    if device.type != "cpu":
        return "torch dequantize + matmul"
    if not _build.load():
        return f"torch dequantize + matmul ({_build.why_not()})"
    return "qmm avx512" if torch.ops.zerostart_quant.avx512() else "qmm portable"


def _bits_group(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    bits = 4 if qweight.dtype == torch.uint8 else 8
    return bits, qweight.shape[1] * (2 if bits == 4 else 1) // scales.shape[1]


def linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T [K, N] (+ bias), in x's dtype."""
    if x.device.type == "cpu" and _build.load():
        bits, group = _bits_group(qweight, scales)
        xf = x.float()
        if x.shape[0] <= DECODE_ROWS:
            y = torch.ops.zerostart_quant.qmm(xf, qweight, scales, mins, bits, group)
            if bias is not None:
                y = y + bias
        else:
            y = F.linear(xf, torch.ops.zerostart_quant.dequant(qweight, scales, mins, bits, group),
                         None if bias is None else bias.float())
        return y.to(x.dtype)
    return F.linear(x, dequantize(qweight, scales, mins, x.dtype), bias)


def rows(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
         dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of W, dequantized: an embedding lookup [len(ids), K]."""
    return dequantize(qweight[ids], scales[ids], None if mins is None else mins[ids], dtype)
