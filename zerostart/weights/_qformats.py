"""The quantized formats' facts that need no torch: which GGUF types stay quantized, in how many
bits and groups, with which scales, and how many bytes a matrix takes held so (the gateway
sizes a model from these before any worker runs; ``_quant`` builds its formats from them).
"""

from __future__ import annotations

# GGUF types kept quantized, and the (bits, group) each becomes
GGUF_FORMATS = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q8_0": (8, 32), "Q5_0": (8, 32),
                "Q5_1": (8, 32), "Q5_K": (8, 32), "Q6_K": (8, 16)}
GGUF_QUANTIZED = frozenset(GGUF_FORMATS)
# scales (and mins) of these types are float16 values; the K-quants' are products of two
# scales, held as float32
F16_SCALES = frozenset({"Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"})
# types held with an offset per group (Q4_0's is its -8 times the scale)
WITH_MINS = frozenset({"Q4_0", "Q4_1", "Q4_K", "Q5_1", "Q5_K"})
GROUP = 32  # the group of quantize(): float matrices quantized at load


def held_nbytes(shape: tuple[int, int], bits: int, group: int, scale_bytes: int, mins: bool) -> int:
    """Bytes of a matrix ``shape`` [N, K] held as ``bits``-bit integers with a scale (and a
    min) per ``group``; the decode kernel's tiles hold the same bytes."""
    n, k = shape
    return n * k * bits // 8 + (n * k // group) * scale_bytes * (2 if mins else 1)


def gguf_held_nbytes(qtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes of a GGUF matrix of ``qtype`` held quantized; None if it is held as floats."""
    if qtype not in GGUF_FORMATS or len(shape) != 2:
        return None
    bits, group = GGUF_FORMATS[qtype]
    return held_nbytes((shape[0], shape[1]), bits, group, 2 if qtype in F16_SCALES else 4, qtype in WITH_MINS)


def quantized_bits(name: str, shape: tuple[int, ...], quantize: str) -> int | None:
    """The bits a float checkpoint's matrix ``name`` is quantized to at load under ``quantize``
    ("int8" | "int4": the matrices at that many bits, the embeddings and LM head at 8: they hold
    every token, and 4 bits cost them the most accuracy); None if it stays a float (another
    setting, not a matrix, or a row not a whole number of groups)."""
    if quantize not in ("int8", "int4") or len(shape) != 2 or not name.endswith(".weight") or shape[1] % GROUP:
        return None
    return 8 if quantize == "int8" or name in ("model.embed_tokens.weight", "lm_head.weight") else 4


def quantized_nbytes(name: str, shape: tuple[int, ...], quantize: str) -> int | None:
    """Bytes of a float checkpoint's tensor ``name`` quantized at load by ``quantize`` (float16
    scales, int4 with mins: what ``_quant.quantize`` writes); None if it stays a float."""
    bits = quantized_bits(name, shape, quantize)
    return None if bits is None else held_nbytes((shape[0], shape[1]), bits, GROUP, 2, bits == 4)
