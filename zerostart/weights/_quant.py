"""Quantized weights as the engine holds them: small integers with per-group scales (and mins).

A quantized matrix W [N, K] named ``<prefix>.weight`` is held as up to three tensors:

    <prefix>.qweight   bits 4: uint8 [N, K/2]; in each group of 32, byte i holds element i
                       (low nibble) and element i + 16 (high nibble), q in [0, 15]
                       bits 8: int8 [N, K]
    <prefix>.scales    float16 (where every scale is exactly one) or float32 [N, K/group]
    <prefix>.mins      same as scales, when the format has an offset

    W[n, k] = scales[n, k // group] * q[n, k] + mins[n, k // group]

so the bits, the group and K follow from the tensors' dtypes and shapes (:func:`qformat`).
The CPU's decode kernel holds the same bytes tiled (``<prefix>.qtiles``, ``.stiles``,
``.mtiles``: rows in tiles of 16, each group's bytes as 64-byte blocks of 4 k of 16 rows; see
``engine/_kernels/qmm.cpp``), made by the engine as it prepares a model and kept in its ready
image; :func:`dequantize` reads both layouts.
GGUF's block formats map onto this without changing a value (``from_gguf``: Q4_0, Q4_1 and
Q4_K as 4 bits, group 32; Q8_0, Q5_0, Q5_1 and Q5_K as 8 bits, group 32; Q6_K as 8 bits,
group 16); a float matrix is quantized by :func:`quantize` (int8: symmetric, group 32, like
Q8_0; int4: with a min, group 32, like Q4_1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

from zerostart.weights._qformats import F16_SCALES, GGUF_FORMATS, GROUP, WITH_MINS

ROWS = ("qweight", "scales", "mins")  # the row layout's parts
TILES = ("qtiles", "stiles", "mtiles")  # the tiled layout's
SUFFIXES = QUANT_SUFFIXES = ROWS + TILES


@dataclass(frozen=True)
class QFormat:
    """How one quantized matrix is held (see the module's docstring)."""

    bits: int  # 4 | 8
    group: int  # 16 | 32 elements per scale
    scale_dtype: torch.dtype  # float16 | float32
    mins: bool  # an offset per group
    shape: tuple[int, int]  # the matrix [N, K]
    tiled: bool = False  # the decode kernel's tiles of 16 rows

    @property
    def kinds(self) -> tuple[str, ...]:
        """The suffixes of the tensors it is held in."""
        names = TILES if self.tiled else ROWS
        return names if self.mins else names[:2]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Suffix -> (shape, dtype) of each tensor the matrix is held in."""
        N, K = self.shape
        qdtype = torch.uint8 if self.bits == 4 else torch.int8
        if self.tiled:  # the same bytes, 16 rows a row
            q, s = (N // 16, K * 16 // (2 if self.bits == 4 else 1)), (N // 16, 16 * K // self.group)
        else:
            q, s = (N, K // (2 if self.bits == 4 else 1)), (N, K // self.group)
        return dict(zip(self.kinds, ((q, qdtype), (s, self.scale_dtype), (s, self.scale_dtype))))

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * d.itemsize for s, d in self.shapes().values())

    def describe(self) -> str:
        return f"int{self.bits} g{self.group}{' +min' if self.mins else ''}"

    def tiles(self) -> "QFormat":
        return QFormat(self.bits, self.group, self.scale_dtype, self.mins, self.shape, True)


def gguf_qformat(qtype: str, shape: tuple[int, ...]) -> QFormat | None:
    """The format a GGUF tensor of ``qtype`` is held in, None if it is held as floats (a float
    type, a type not in GGUF_FORMATS, or not a matrix)."""
    if qtype not in GGUF_FORMATS or len(shape) != 2:
        return None
    bits, group = GGUF_FORMATS[qtype]
    return QFormat(bits, group, torch.float16 if qtype in F16_SCALES else torch.float32, qtype in WITH_MINS,
                   (shape[0], shape[1]))


def qformat(tensors: dict[str, torch.Tensor], prefix: str) -> QFormat | None:
    """The format of the quantized matrix ``prefix`` (``model.layers.0.mlp.up_proj``), None if
    ``tensors`` hold it as a plain ``.weight``; a ValueError naming it if its parts disagree."""
    tiled = f"{prefix}.qtiles" in tensors
    names = TILES if tiled else ROWS
    qw, sc, mn = (tensors.get(f"{prefix}.{s}") for s in names)
    if qw is None:
        return None
    q, s, m = (f"{prefix}.{n}" for n in names)
    if sc is None or qw.dim() != 2 or sc.dim() != 2 or qw.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"{prefix}: a quantized matrix needs a 2-D {q} (uint8 or int8) and 2-D {s}")
    bits = 4 if qw.dtype == torch.uint8 else 8
    per = 2 if bits == 4 else 1
    N, K = (qw.shape[0] * 16, qw.shape[1] * per // 16) if tiled else (qw.shape[0], qw.shape[1] * per)
    groups = sc.shape[1] // 16 if tiled else sc.shape[1]
    if sc.shape[0] != qw.shape[0] or groups == 0 or K % groups or sc.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"{s}: shape {tuple(sc.shape)} {sc.dtype} does not fit {q} {tuple(qw.shape)}")
    group = K // groups
    if (bits, group) not in ((4, 32), (8, 32), (8, 16)):
        raise ValueError(f"{prefix}: int{bits} with groups of {group} is not a supported quantized format")
    if mn is not None and (mn.shape != sc.shape or mn.dtype != sc.dtype):
        raise ValueError(f"{m}: shape {tuple(mn.shape)} {mn.dtype} does not match {s}")
    return QFormat(bits, group, sc.dtype, mn is not None, (N, K), tiled)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
               dtype: torch.dtype = torch.float32, tiled: bool = False,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """The matrix [N, K] in ``dtype``, with torch operations (any device; the reference the
    kernels are tested against). ``tiled``: the parts are ``qtiles``, ``stiles``, ``mtiles``.
    ``rows``: only these rows, [len(rows), K] (an embedding lookup)."""
    if tiled:
        qweight, scales, mins = untile(qweight, scales, mins, rows)
    elif rows is not None:
        qweight, scales, mins = qweight[rows], scales[rows], None if mins is None else mins[rows]
    N = qweight.shape[0]
    if qweight.dtype == torch.uint8:  # nibbles -> [N, K/32, 32] in element order
        b = qweight.view(N, -1, 16)
        q = torch.cat((b & 0x0F, b >> 4), dim=-1).reshape(N, -1)
    else:
        q = qweight
    group = q.shape[1] // scales.shape[1]
    w = q.view(N, -1, group).float() * scales.float().unsqueeze(-1)
    if mins is not None:
        w = w + mins.float().unsqueeze(-1)
    return w.reshape(N, -1).to(dtype)


def untile(qtiles: torch.Tensor, stiles: torch.Tensor, mtiles: torch.Tensor | None,
           rows: torch.Tensor | None = None):
    """The tiled layout's parts in the row layout (torch operations); ``rows``: only these rows
    (an embedding lookup), read from their tiles alone."""
    T = qtiles.shape[0]
    G = stiles.shape[1] // 16
    if rows is not None:
        # bytes 4r .. 4r + 3 of every 64-byte block are row r's, and in their order they are its
        # row layout (8 bits: k in order; 4 bits: byte i of a group holds k = i and i + 16)
        tile, r = rows // 16, rows % 16
        q = qtiles.view(T, -1, 16, 4)[tile, :, r].reshape(len(rows), -1)

        def picked(s: torch.Tensor) -> torch.Tensor:  # [T, G * 16] -> [len(rows), G]
            return s.view(T, G, 16)[tile, :, r]

        return q, picked(stiles), None if mtiles is None else picked(mtiles)

    def rows_of(s: torch.Tensor) -> torch.Tensor:  # [T, G * 16] -> [T * 16, G]
        return s.view(T, G, 16).transpose(1, 2).reshape(T * 16, G)

    if qtiles.dtype == torch.int8:  # [T, G, group/4, 16, 4] -> [T, 16, G, group/4, 4]
        K = qtiles.shape[1] // 16
        group = K // G
        q = qtiles.view(T, G, group // 4, 16, 4).permute(0, 3, 1, 2, 4).reshape(T * 16, K)
    else:  # [T, G, group/8, 16, 4] bytes: low nibbles k = 4t + i, high ones k = 4(t + group/8) + i
        K = qtiles.shape[1] // 8
        group = K // G
        b = qtiles.view(T, G, group // 8, 16, 4)
        vals = torch.stack((b & 0x0F, b >> 4), dim=2)  # [T, G, 2, group/8, 16, 4]
        v = vals.permute(0, 4, 1, 2, 3, 5).reshape(T * 16, K // 32, 32)  # element order within groups of 32
        q = (v[:, :, :16] | (v[:, :, 16:] << 4)).reshape(T * 16, K // 2)
    return q, rows_of(stiles), None if mtiles is None else rows_of(mtiles)


def pack4(q: np.ndarray) -> np.ndarray:
    """q [N, K] values 0..15 -> the nibble layout [N, K/2] (byte i of a group: i | i + 16)."""
    N, K = q.shape
    g = q.reshape(N, K // 32, 2, 16).astype(np.uint8)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(N, K // 2)


def from_gguf(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """A GGUF tensor's stored bytes (``qtype``, [N, K]) as qweight/scales(/mins) arrays with
    the same values (the format's own integers and scales)."""
    N, K = shape
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    b = np.ascontiguousarray(raw).reshape(N * K // block, size)

    def f16(lo: int, hi: int) -> np.ndarray:
        return b[:, lo:hi].copy().view(np.float16).astype(np.float32).reshape(-1, 1)

    def rows(x: np.ndarray, per_row: int) -> np.ndarray:
        return x.reshape(N, per_row)

    out: dict[str, np.ndarray]
    if qtype == "Q8_0":
        out = {"qweight": b[:, 2:].copy().view(np.int8).reshape(N, K), "scales": f16(0, 2)}
    elif qtype in ("Q4_0", "Q4_1"):
        d = f16(0, 2)
        m = f16(2, 4) if qtype == "Q4_1" else -8 * d
        qs = b[:, 4:20] if qtype == "Q4_1" else b[:, 2:18]
        out = {"qweight": qs.reshape(N, K // 2).copy(), "scales": d, "mins": m}
    elif qtype in ("Q5_0", "Q5_1"):
        at = 4 if qtype == "Q5_1" else 2
        qh = b[:, at : at + 4].copy().view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
        qs = b[:, at + 4 : at + 20]
        low = np.concatenate((qs & 0x0F, qs >> 4), axis=1)  # elements 0..15, 16..31
        q = (low | ((qh & 1).astype(np.uint8) << 4)).astype(np.int16)
        d = f16(0, 2)
        out = {"qweight": (q - (16 if qtype == "Q5_0" else 0)).astype(np.int8).reshape(N, K), "scales": d}
        if qtype == "Q5_1":
            out["mins"] = f16(2, 4)
    elif qtype in ("Q4_K", "Q5_K"):
        d, dmin = f16(0, 2), f16(2, 4)
        sc, mn = Q4_K.get_scale_min(b[:, 4:16])
        scales, mins = d * sc.astype(np.float32), -dmin * mn.astype(np.float32)  # [blocks, 8]
        qs = b[:, -128:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 8, 32)  # 8 groups of 32 per block
        if qtype == "Q5_K":
            qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            q = q | ((qh & 1) << 4)
            out = {"qweight": q.astype(np.int8).reshape(N, K)}
        else:
            out = {"qweight": pack4(q.reshape(N, K))}
        out.update(scales=scales, mins=mins)
    elif qtype == "Q6_K":
        ql, qh = b[:, :128], b[:, 128:192]
        sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)  # [blocks, 16]
        d = f16(208, 210)
        low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = (low.reshape(-1, 256) | (high.reshape(-1, 256) << 4)).astype(np.int16) - 32
        out = {"qweight": q.astype(np.int8).reshape(N, K), "scales": d * sc}
    else:
        raise ValueError(f"GGUF type {qtype} is not held quantized (held: {', '.join(GGUF_FORMATS)})")
    groups = K // GGUF_FORMATS[qtype][1]
    half = qtype in F16_SCALES
    for key in ("scales", "mins"):
        if key in out:
            v = rows(out[key], groups)
            out[key] = v.astype(np.float16) if half else np.ascontiguousarray(v, dtype=np.float32)
            if half and not np.array_equal(out[key].astype(np.float32), v, equal_nan=True):
                raise ValueError(f"its {key} do not fit in float16 (a scale of magnitude {np.abs(v).max():g})")
    return out


def quantize(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """A float matrix [N, K] (K a multiple of 32) quantized to ``bits`` with groups of 32:
    int8 symmetric (as Q8_0), int4 with a min (as Q4_1); scales and mins float16, the integers
    rounded against the float16 values they are stored as."""
    N, K = w.shape
    if K % GROUP:
        raise ValueError(f"a matrix of {K} columns cannot be quantized in groups of {GROUP}")
    g = w.float().reshape(N, K // GROUP, GROUP)
    if bits == 8:
        s = (g.abs().amax(-1) / 127).half()
        inv = torch.where(s > 0, 1 / s.float(), torch.zeros_like(s, dtype=torch.float32))
        q = torch.round(g * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return {"qweight": q.reshape(N, K), "scales": s}
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    lo, hi = g.amin(-1), g.amax(-1)
    s, m = ((hi - lo) / 15).half(), lo.half()
    inv = torch.where(s > 0, 1 / s.float(), torch.zeros_like(s, dtype=torch.float32))
    q = torch.round((g - m.float().unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    pairs = q.view(N, K // 32, 2, 16)
    return {"qweight": (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(N, K // 2), "scales": s, "mins": m}
