"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) as one module.

Built on the meta device and filled with the loaded arena's tensors (``_weights.fill``), so no
memory is initialized twice. Rows are a flat batch of tokens ([T, hidden]); attention reads and
writes the preallocated KV cache as described by a :class:`StepContext`.

With ``kernels`` (set by :meth:`Transformer.use_kernels`: the CPU with the engine's kernels built)
the work between the matmuls runs as the kernels' fused ops (``_kernels.ops``): residual add +
norm, rotary + KV write, decode attention over the cache without masks, SiLU-and-multiply. The
torch ops beside them are the reference they are tested against. A step whose rows all decode
then runs its layers as one call (:meth:`Transformer.decode_stack`: the same ops in the same
order, without Python between them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from zerostart.engine import _kernels
from zerostart.engine._config import ModelShape
from zerostart.engine._context import Prefill, StepContext
from zerostart.weights import QFormat


Formats = dict[str, list[QFormat | None]]  # model prefix ("layers.0.attn.qkv") -> each part's format (None: floats)


class RMSNorm(nn.Module):
    kernels = False

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels and x.dim() == 2:
            return _kernels.ops.add_rms_norm(x, None, self.weight, self.eps)[0]
        # statistics in float32 as the reference computes them; no casts when x is float32
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (h if x.dtype == torch.float32 else h.to(x.dtype))

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a residual connection and the norm after it."""
        if self.kernels:
            return _kernels.ops.add_rms_norm(x, residual, self.weight, self.eps)
        h = x + residual
        return self(h), h


class Proj(nn.Module):
    """Linear projections of one input (q/k/v, gate/up, or a single one).

    Fused: one matrix [sum(sizes), in] and one matmul whose output is split. Unfused: one
    matrix per part (``weight0``, ``weight1``, ...), used when the parts are not one tensor.
    A matrix is a float ``weight``, or held quantized (``fmts``: ``qweight``, ``scales``,
    ``mins`` buffers, multiplied by ``_kernels.linear``).
    """

    def __init__(self, in_features: int, sizes: tuple[int, ...], bias: bool, fused: bool,
                 fmts: list[QFormat | None] | None = None) -> None:
        super().__init__()
        self.sizes = sizes
        self.fused = fused or len(sizes) == 1
        names = [""] if self.fused else [str(i) for i in range(len(sizes))]
        shapes = [sum(sizes)] if self.fused else list(sizes)
        self.fmts: list[QFormat | None] = []
        for name, rows, fmt in zip(names, shapes, fmts or [None] * len(names)):
            if fmt is None:
                self.register_parameter("weight" + name, nn.Parameter(torch.empty(rows, in_features), requires_grad=False))
            else:
                fmt = QFormat(fmt.bits, fmt.group, fmt.scale_dtype, fmt.mins, (rows, in_features), fmt.tiled)
                for kind, (shape, dtype) in fmt.shapes().items():
                    self.register_buffer(kind + name, torch.empty(shape, dtype=dtype))
            self.fmts.append(fmt)
            if bias:
                self.register_parameter("bias" + name, nn.Parameter(torch.empty(rows), requires_grad=False))
        self.has_bias = bias

    weight: torch.Tensor  # fused: [sum(sizes), in_features] (else weight0, weight1, ...)
    bias: torch.Tensor

    def _parts(self, i: str, fmt: QFormat) -> list[torch.Tensor]:
        return [self._buffers[kind + i] for kind in fmt.kinds]  # type: ignore[misc]  # registered in __init__

    kernels = False

    def _matmul(self, x: torch.Tensor, i: str, fmt: QFormat | None) -> torch.Tensor:
        # the module's dicts read directly: nn.Module's __getattr__ costs a microsecond a call,
        # and a decode step of a small model makes thousands of them
        bias = self._parameters["bias" + i] if self.has_bias else None
        if fmt is not None:
            return _kernels.linear(x, self._parts(i, fmt), fmt, bias)
        w = self._parameters["weight" + i]
        assert w is not None  # registered in __init__
        if self.kernels and x.shape[0] <= _kernels.MV_ROWS and x.dtype == torch.bfloat16:
            return _kernels.ops.mv_bf16(x, w, bias)
        return F.linear(x, w, bias)

    def stack_proj(self):
        """This projection for the kernels' decode stack (``_kernels.ops.Proj``)."""
        names = [""] if self.fused else [str(i) for i in range(len(self.sizes))]
        matrices = []
        for i, fmt in zip(names, self.fmts):
            parts = [getattr(self, "weight" + i)] if fmt is None else self._parts(i, fmt)
            matrices.append(_kernels.matrix(parts, fmt, getattr(self, "bias" + i) if self.has_bias else None))
        return _kernels.ops.Proj(matrices, list(self.sizes))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused:
            y = self._matmul(x, "", self.fmts[0])
            return [y] if len(self.sizes) == 1 else list(y.split(self.sizes, dim=-1))
        return [self._matmul(x, str(i), fmt) for i, fmt in enumerate(self.fmts)]

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of the (single, fused) matrix: an embedding lookup [len(ids), in]."""
        fmt = self.fmts[0]
        if fmt is not None:
            return _kernels.rows(ids, self._parts("", fmt), fmt, dtype)
        return F.embedding(ids, self.weight)


@dataclass
class Rope:
    """The rotary tables [positions, head_dim] (cos, and sin with its first half negated)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each row's position, [T, 1, head_dim]."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, 1, D], sin's first half negated (_rope.cos_sin_table), so
    # rotate_half(x) * sin is the halves of x swapped (one flip) times sin: the reference's
    # cat(-x2, x1) * sin value for value, in one kernel instead of four
    T, H, D = x.shape
    swapped = x.view(T, H, 2, D // 2).flip(2).view(T, H, D)
    return x * cos + swapped * sin


class Attention(nn.Module):
    kernels = False

    def __init__(self, cfg: ModelShape, layer: int, fuse_qkv: bool, formats: Formats) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.sliding_windows[layer]
        self.scale = cfg.head_dim ** -0.5
        p = f"layers.{layer}.attn."
        self.qkv = Proj(cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size), cfg.qkv_bias, fuse_qkv, formats.get(p + "qkv"))
        self.o = Proj(cfg.q_size, (cfg.hidden_size,), cfg.o_bias, True, formats.get(p + "o"))
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: Rope, ctx: StepContext,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]; k_cache, v_cache: [slots, kv_heads, positions, head_dim]
        T = x.shape[0]
        q, k, v = self.qkv(x)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kernels:  # rotated in place, decode rows written into the cache
            _kernels.ops.rope_write_(q, k, v, rope.cos, rope.sin, ctx.positions, k_cache, v_cache,
                                     ctx.kv_slots, ctx.kv_pos)
            _write_kv(ctx, k, v, k_cache, v_cache, decode=False)
        else:
            cos, sin = rope.rows(ctx.positions)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            _write_kv(ctx, k, v, k_cache, v_cache)
        outs = [self._decode(q, ctx, k_cache, v_cache)] if ctx.num_decode else []
        outs += [self._prefill(q, p, ctx, k_cache, v_cache) for p in ctx.prefills]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.o(out)[0]

    def _decode(self, q: torch.Tensor, ctx: StepContext, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        # GQA without repeating keys: the query heads sharing a KV head become its query rows.
        nd, group = ctx.num_decode, self.num_heads // self.num_kv_heads
        if self.kernels:
            assert ctx.decode_lens is not None  # set with num_decode
            return _kernels.ops.decode_attention(q[:nd], k_cache, v_cache, ctx.decode_slots, ctx.decode_lens,
                                                 self.window or -1, self.scale)
        qd = (q if nd == q.shape[0] else q[:nd]).view(nd, self.num_kv_heads, group, self.head_dim)
        if ctx.decode_slots is None:  # rows are slots [0, nd): a view
            kd = k_cache[:nd, :, : ctx.decode_len]
            vd = v_cache[:nd, :, : ctx.decode_len]
        else:
            kd = k_cache[:, :, : ctx.decode_len].index_select(0, ctx.decode_slots)
            vd = v_cache[:, :, : ctx.decode_len].index_select(0, ctx.decode_slots)
        kd, vd = kd.to(q.dtype), vd.to(q.dtype)  # a cache in another dtype (_load.kv_dtype): the rows read
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=ctx.masks[self.window], scale=self.scale)
        return o.reshape(nd, self.num_heads * self.head_dim)

    def _prefill(self, q: torch.Tensor, p: Prefill, ctx: StepContext, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> torch.Tensor:
        # [1, heads, S, D] against the slot's keys [1, kv_heads, start + S, D]
        qp = q[p.row : p.row + p.length].transpose(0, 1).unsqueeze(0)
        end = p.start + p.length
        kp = k_cache[p.slot : p.slot + 1, :, :end].to(q.dtype)
        vp = v_cache[p.slot : p.slot + 1, :, :end].to(q.dtype)
        mask = ctx.prefill_masks[(p.row, self.window)]
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(p.length, self.num_heads * self.head_dim)


def _write_kv(ctx: StepContext, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              decode: bool = True) -> None:
    """The step's keys and values into the cache: decode rows each at its own slot and
    position (unless ``decode`` is False), a prefill chunk as one slice of its slot.
    k, v: [T, kv_heads, head_dim]."""
    nd = ctx.num_decode
    if nd and decode:
        k_cache[ctx.kv_slots, :, ctx.kv_pos] = (k if nd == k.shape[0] else k[:nd]).to(k_cache.dtype)
        v_cache[ctx.kv_slots, :, ctx.kv_pos] = (v if nd == v.shape[0] else v[:nd]).to(v_cache.dtype)
    for p in ctx.prefills:
        k_cache[p.slot, :, p.start : p.start + p.length] = k[p.row : p.row + p.length].transpose(0, 1)
        v_cache[p.slot, :, p.start : p.start + p.length] = v[p.row : p.row + p.length].transpose(0, 1)


class MLP(nn.Module):
    kernels = False

    def __init__(self, cfg: ModelShape, layer: int, fuse_gate_up: bool, formats: Formats) -> None:
        super().__init__()
        p = f"layers.{layer}.mlp."
        self.gate_up = Proj(cfg.hidden_size, (cfg.intermediate_size, cfg.intermediate_size), cfg.mlp_bias, fuse_gate_up,
                            formats.get(p + "gate_up"))
        self.down = Proj(cfg.intermediate_size, (cfg.hidden_size,), cfg.mlp_bias, True, formats.get(p + "down"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        if self.kernels:
            return self.down(_kernels.ops.silu_mul(gate, up))[0]
        return self.down(F.silu(gate) * up)[0]


class Block(nn.Module):
    def __init__(self, cfg: ModelShape, layer: int, fuse_qkv: bool, fuse_gate_up: bool, formats: Formats) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer, fuse_qkv, formats)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer, fuse_gate_up, formats)

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None, rope: Rope, ctx: StepContext,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream ``h`` and the previous block's output ``delta`` not yet added to
        it (so the add and the norm after it are one op) -> this block's (h, delta)."""
        x, h = (self.input_norm(h), h) if delta is None else self.input_norm.add(delta, h)
        x, h = self.post_norm.add(self.attn(x, rope, ctx, k_cache, v_cache), h)
        return h, self.mlp(x)

    def stack_layer(self):
        """This block for the kernels' decode stack (``_kernels.ops.Layer``): what
        :meth:`forward` computes for decode rows with the kernels on."""
        a, mlp = self.attn, self.mlp
        return _kernels.ops.Layer(
            self.input_norm.weight, self.post_norm.weight, self.input_norm.eps, a.qkv.stack_proj(), a.o.stack_proj(),
            mlp.gate_up.stack_proj(), mlp.down.stack_proj(), None if a.q_norm is None else a.q_norm.weight,
            None if a.k_norm is None else a.k_norm.weight, a.num_heads, a.num_kv_heads, a.head_dim, a.window or -1,
            a.scale)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelShape, fuse_qkv: list[bool], fuse_gate_up: list[bool],
                 formats: Formats | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        formats = formats or {}
        # embeddings [vocab, hidden]: rows looked up, and (tied) the LM head's matrix
        self.embed = Proj(cfg.hidden_size, (cfg.vocab_size,), False, True, formats.get("embed"))
        self.layers = nn.ModuleList(Block(cfg, i, fuse_qkv[i], fuse_gate_up[i], formats) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Proj(cfg.hidden_size, (cfg.vocab_size,), False, True,
                                                                 formats.get("lm_head"))
        self.windows = sorted(set(cfg.sliding_windows), key=lambda w: -1 if w is None else w)
        # set by the runner: rotary tables [max_len + 1, head_dim] and the KV cache views
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        # execute-while-load: called with the stage about to run (-1 embed, i layer i, N head)
        # while the weights are still arriving; blocks until that stage's tensors are in place
        self.wait_stage: Callable[[int], None] | None = None

    def forward(self, ctx: StepContext, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        """Logits [rows, vocab] (float32) for ``ctx.logits_rows`` (every row when None); with
        ``ctx.hidden_rows`` also the final normed hidden states of those rows, in ``ctx.hidden_out``."""
        self.build_masks(ctx)
        wait = self.wait_stage
        if wait is not None:
            wait(-1)
        h = self.embed.lookup(ctx.input_ids, self.norm.weight.dtype)
        assert self.cos is not None and self.sin is not None, "the runner sets the rotary tables first"
        if self.stack and ctx.num_decode and not ctx.prefills and wait is None:  # decode rows only: one call
            h, delta = self.decode_stack().run(h, self.cos, self.sin, ctx.positions, k_caches, v_caches, ctx.kv_slots,
                                               ctx.kv_pos, ctx.decode_slots, ctx.decode_lens)
        else:
            rope = Rope(self.cos, self.sin)
            delta = None
            for i, layer in enumerate(self.layers):
                if wait is not None:
                    wait(i)
                h, delta = layer(h, delta, rope, ctx, k_caches[i], v_caches[i])
        if delta is not None:
            h = h + delta
        pooled = h[ctx.hidden_rows] if ctx.hidden_rows is not None else None
        if ctx.logits_rows is not None:
            h = h[ctx.logits_rows]
        if wait is not None:
            wait(len(self.layers))
        if pooled is not None:
            ctx.hidden_out = self.norm(pooled).float()
        h = self.norm(h)
        return (self.embed if self.lm_head is None else self.lm_head)(h)[0].float()

    def use_kernels(self, on: bool, stack: bool = True) -> None:
        """Run the fused step ops (``_kernels.ops``) or the torch reference; with ``stack`` (and
        ``on``), steps of decode rows only run every layer in one call (:meth:`decode_stack`)."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP, Proj)):
                m.kernels = on
        self.kernels = on
        self.stack = on and stack
        self._stack = None  # made again on first use: the modules' tensors as they are now

    kernels = False
    stack = False
    _stack = None

    def quantized(self) -> bool:
        """Whether any matrix is held quantized."""
        return any(f is not None for m in self.modules() if isinstance(m, Proj) for f in m.fmts)

    def decode_stack(self):
        """The decoder layers as one kernels call (``_kernels.ops.DecodeStack``), made on first use."""
        if self._stack is None:
            self._stack = _kernels.decode_stack([cast(Block, layer).stack_layer() for layer in self.layers])
        return self._stack

    def build_masks(self, ctx: StepContext) -> None:
        device = ctx.input_ids.device
        if ctx.num_decode and not self.kernels:  # the fused decode attention needs no masks
            assert ctx.decode_lens is not None  # set with num_decode
            keys = torch.arange(ctx.decode_len, device=device)[None, :]
            lens = ctx.decode_lens[:, None]
            full = keys < lens  # [nd, L]
            for w in self.windows:
                m = full if w is None else full & (keys >= lens - w)
                ctx.masks[w] = m[:, None, None, :]
        for p in ctx.prefills:
            end = p.start + p.length
            q_pos = torch.arange(p.start, end, device=device)[:, None]
            keys = torch.arange(end, device=device)[None, :]
            for w in self.windows:
                if w is None and p.start == 0:
                    ctx.prefill_masks[(p.row, w)] = None  # plain causal
                    continue
                m = keys <= q_pos
                if w is not None:
                    m = m & (keys > q_pos - w)
                ctx.prefill_masks[(p.row, w)] = m
