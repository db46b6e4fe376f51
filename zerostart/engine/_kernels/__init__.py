"""Quantized linear layers: the matmuls and lookups over weights held as small integers with
group scales (``zerostart.weights`` formats: int4 or int8, groups of 16 or 32).

    y = linear(x, parts, fmt)        # x [M, K] -> [M, N]; parts: the matrix's tensors (fmt.kinds)
    h = rows(ids, parts, fmt, dtype)  # embedding lookup

The kernel follows the batch and the CPU (measured in ``bench/quant_kernels.py``):

| rows of x | CPU, kernels built, tiled matrix | CPU, row layout | CUDA, or no kernels |
| --- | --- | --- | --- |
| <= DECODE_ROWS (decode) | ``qmm_tiles``: x to int8 per group, VNNI integer dot products (AVX-512 VNNI; a portable loop elsewhere) | ``qmm``: dequantized in registers (float) | dequantize, ``F.linear`` |
| more (prefill) | ``qmm_tiles`` (ahead of untiling + a bfloat16 or float32 BLAS matmul at 64 to 512 rows) | ``dequant``, then ``F.linear`` | dequantize, ``F.linear`` |

The step's other work (norms, rotary and the KV write, decode attention, SiLU-and-multiply, and a
bfloat16 matrix-vector for up to ``MV_ROWS`` rows) has fused CPU ops in the same library
(``step.cpp``), which a model runs where :func:`fused` says so; a step of decode rows only runs
all its layers in one call (:func:`decode_stack`, ``layers.cpp``). ``ops`` is the library's ops.

On CPU the engine tiles every quantized matrix of 16k rows as it prepares a model
(:func:`tile_matrices`), in place: the same bytes, in the order the decode kernel reads them.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from zerostart.engine._errors import EngineError
from zerostart.engine._kernels import _build
from zerostart.weights import QFormat, dequantize

# at most this many rows run the row layout's in-register kernel; more are dequantized once and
# multiplied by BLAS (bench/quant_kernels.py: qmm ahead at 16 rows, dequantize + BLAS at 128)
DECODE_ROWS = 32
# at most this many rows of bfloat16 activations run ``mv_bf16`` over bfloat16 weights; more run
# torch's bfloat16 matmul (bench/quant_kernels.py at 1 and 16 rows; SmolLM2's shapes one by one:
# mv_bf16 ahead at 1-4 rows, behind from 8)
MV_ROWS = 4

__all__ = ["DECODE_ROWS", "MV_ROWS", "cpu_kernels", "decode_stack", "fused", "kernel", "linear", "matrix", "ops",
           "prepare", "quant_kernels", "rows", "tile_matrices"]


class _Ops:
    """The library's functions (``qmm_tiles``, ``add_rms_norm``, ...), each looked up in the
    loaded module on first use and kept as a plain attribute after."""

    def __getattr__(self, name: str):
        fn = getattr(cpu_kernels(), name)
        setattr(self, name, fn)
        return fn


ops = _Ops()


def prepare(device: torch.device) -> str:
    """Load the CPU kernels for a model on ``device`` (never builds); returns :func:`kernel`."""
    if device.type == "cpu":
        _build.load()
    return kernel(device)


def quant_kernels(build: bool = False) -> str:
    """The CPU kernels quantized layers run here (loaded; with ``build``, built first if
    missing: ~30 s once per machine), in words; an EngineError saying why there are none."""
    cpu_kernels(build)
    return kernel(torch.device("cpu"))


def cpu_kernels(build: bool = False) -> ModuleType:
    """The CPU kernels' module (``qmm_tiles``, ``add_rms_norm``, ...: what ``ops`` holds), for
    benchmarks and tests; with ``build``, built first if missing; an EngineError saying why not."""
    if not _build.load(build=build):
        raise EngineError(_build.why_not())
    return _build.module()


def kernel(device: torch.device) -> str:
    """Which kernels quantized layers run on ``device``, in words (for logs and status)."""
    if device.type != "cpu":
        return "torch dequantize + matmul"
    if not _build.load():
        return f"torch dequantize + matmul ({_build.why_not()})"
    return "qmm_tiles avx512-vnni" if ops.vnni() else "qmm_tiles portable"


def fused(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on ``device`` with activations in ``dtype`` runs the fused step ops."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _build.load()


def tile_matrices(tensors: dict[str, torch.Tensor], formats: dict[str, QFormat]) -> int:
    """Rewrite the row-layout matrices of ``formats`` (name -> format) that the CPU kernels can
    tile (16k rows) into the tiled layout, in place: each part's bytes overwritten by the same
    bytes reordered, its entry in ``tensors`` replaced by the tiled view. Returns the bytes
    rewritten (0 without kernels)."""
    if not _build.load():
        return 0
    done = 0
    for name, fmt in formats.items():
        if fmt.tiled or fmt.shape[0] % 16:
            continue
        prefix = name.removesuffix(".weight")
        parts = [tensors[f"{prefix}.{k}"] for k in fmt.kinds]
        if any(p.device.type != "cpu" or not p.is_contiguous() for p in parts):
            continue
        tiled = ops.tile(parts[0], parts[1], parts[2] if fmt.mins else None, fmt.bits, fmt.group)
        for old, new, kind in zip(parts, tiled, fmt.tiles().kinds):
            flat = old.view(-1).view(torch.uint8)
            flat.copy_(new.reshape(-1).view(torch.uint8))
            tensors[f"{prefix}.{kind}"] = old.view(-1).view(new.dtype).view(new.shape)
            done += flat.numel()
        for kind in fmt.kinds:
            del tensors[f"{prefix}.{kind}"]
    return done


def linear(x: torch.Tensor, parts: list[torch.Tensor], fmt: QFormat, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T [K, N] (+ bias), in x's dtype. ``parts``: the tensors ``fmt.kinds`` name."""
    q, s, m = parts[0], parts[1], parts[2] if fmt.mins else None
    if x.device.type == "cpu" and _build.load():
        if fmt.tiled or x.shape[0] <= DECODE_ROWS:
            xf = x if x.dtype == torch.float32 else x.float()
            y = (ops.qmm_tiles if fmt.tiled else ops.qmm)(xf, q, s, m, fmt.bits, fmt.group)
            if bias is not None:
                y = y + bias
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        return F.linear(x, ops.dequant(q, s, m, fmt.bits, fmt.group).to(x.dtype), bias)
    return F.linear(x, dequantize(q, s, m, x.dtype, fmt.tiled), bias)


def matrix(parts: list[torch.Tensor], fmt: QFormat | None, bias: torch.Tensor | None = None):
    """One matrix for a decode stack (``ops.Matrix``), multiplied as :func:`linear` multiplies it
    (``parts``: [weight] for floats, else the tensors ``fmt.kinds`` name)."""
    if fmt is None:
        return ops.Matrix("float", parts[0], bias=bias)
    return ops.Matrix("tiles" if fmt.tiled else "rows", parts[0], parts[1], parts[2] if fmt.mins else None, bias,
                      fmt.bits, fmt.group)


def decode_stack(layers: list):
    """A model's decoder layers (``ops.Layer``, each block's :meth:`stack_layer`) as one call for
    steps of decode rows only (``layers.cpp``), with this module's kernel limits."""
    return ops.DecodeStack(layers, MV_ROWS, DECODE_ROWS)


def rows(ids: torch.Tensor, parts: list[torch.Tensor], fmt: QFormat, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of W, dequantized: an embedding lookup [len(ids), K]."""
    return dequantize(parts[0], parts[1], parts[2] if fmt.mins else None, dtype, fmt.tiled, rows=ids)
