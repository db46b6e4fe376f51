"""Rotary position embeddings: inverse frequencies per rope type, and cos/sin tables.

Computed in float32 the way the reference implementation does (positions times inverse
frequencies, one multiply each), then cast to the model's dtype, so logits match bit for bit
where the rest of the arithmetic does.
"""

from __future__ import annotations

import math

import torch

from zerostart.engine._config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the factor cos/sin are scaled by."""
    dim = head_dim
    base = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    freqs = 1.0 / (rope.theta ** base)
    if rope.rope_type == "default":
        return freqs, 1.0
    if rope.rope_type == "linear":
        return freqs / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(freqs, rope), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, dim)
    raise ValueError(f"rope type {rope.rope_type!r}")


def _llama3(freqs: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / rope.factor, freqs)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    freqs = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return freqs, float(attention_factor)


def cos_sin_table(rope: RopeConfig, head_dim: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_len, head_dim] in ``dtype`` (the halves repeated, rotate-half
    layout), sin's first half negated: ``x * cos + swap_halves(x) * sin`` is the reference's
    ``x * cos + rotate_half(x) * sin``, value for value."""
    freqs, scale = inv_freq(rope, head_dim)
    pos = torch.arange(max_len, dtype=torch.float32)
    angles = pos[:, None] * freqs[None, :]  # [L, D/2]
    emb = torch.cat((angles, angles), dim=-1)
    cos = (emb.cos() * scale).to(dtype)
    sin = (emb.sin() * scale).to(dtype)
    sin[:, : head_dim // 2].neg_()
    return cos.to(device), sin.to(device)
