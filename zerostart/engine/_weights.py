"""From the loaded arena's tensors (Hugging Face names) to the model's parameters, without copies.

Each parameter of :class:`Transformer` is mapped from checkpoint names. A matrix is a float
``<prefix>.weight`` or a quantized ``<prefix>.qweight/.scales/.mins`` (``weights.QFormat``). Projections that run on
the same input (q/k/v, gate/up) become one fused matmul when their weights are one tensor:

- already back to back in the arena, in order: the fused weight is a view (free);
- otherwise, where allowed (arena in device memory, a CPU arena that says it is writable
  private memory, or ``fuse="always"``), the layer's span of
  the arena is regrouped in place through a temporary buffer the size of that span, so the
  result is still one allocation and the next image of it is already fused;
- otherwise the parts stay separate (several matmuls, no extra memory).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from zerostart.engine._config import MAX_MODEL_LEN_CAP, ModelShape
from zerostart.engine._errors import EngineError
from zerostart.engine import _kernels
from zerostart.engine._model import Formats, Transformer
from zerostart.engine._rope import cos_sin_table
from zerostart.weights import QUANT_SUFFIXES, QFormat, qformat, quantize_arena, quantized_bits


@dataclass
class FusePlan:
    qkv: list[bool]
    gate_up: list[bool]
    regrouped_bytes: int = 0  # bytes moved inside the arena by regrouping
    notes: list[str] = field(default_factory=list)


def expected_shapes(cfg: ModelShape) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for every tensor the model needs."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        out[p + "post_attention_layernorm.weight"] = (H,)
        for name, rows in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
            out[f"{p}self_attn.{name}_proj.weight"] = (rows, H)
            if cfg.qkv_bias:
                out[f"{p}self_attn.{name}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (H, cfg.q_size)
        if cfg.o_bias:
            out[p + "self_attn.o_proj.bias"] = (H,)
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
        out[p + "mlp.gate_proj.weight"] = (I, H)
        out[p + "mlp.up_proj.weight"] = (I, H)
        out[p + "mlp.down_proj.weight"] = (H, I)
        if cfg.mlp_bias:
            for name, n in (("gate", I), ("up", I), ("down", H)):
                out[f"{p}mlp.{name}_proj.bias"] = (n,)
    return out


def _matrix(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str) -> QFormat | None:
    """Check the matrix ``name`` (``<prefix>.weight``), held as floats or quantized; returns its
    format (None: floats, or not present)."""
    prefix = name.removesuffix(".weight")
    try:
        fmt = qformat(tensors, prefix) if name.endswith(".weight") else None
    except ValueError as e:
        raise EngineError(f"{where}: {e}") from None
    if fmt is not None and fmt.shape != shape:
        raise EngineError(f"{where}: quantized tensor {prefix!r} holds a {fmt.shape} matrix, config.json implies {shape}")
    return fmt


def check(cfg: ModelShape, tensors: dict[str, torch.Tensor], where: str) -> dict[str, QFormat]:
    """Every needed tensor present, with its shape and a floating dtype (or held quantized);
    errors name the tensor. Returns the quantized matrices' formats by name (``<prefix>.weight``)."""
    expected = expected_shapes(cfg)
    formats: dict[str, QFormat] = {}
    for name, shape in expected.items():
        fmt = _matrix(tensors, name, shape, where)
        if fmt is not None:
            formats[name] = fmt
            continue
        t = tensors.get(name)
        if t is None:
            if name == "lm_head.weight":
                raise EngineError(f"{where}: no 'lm_head.weight' and tie_word_embeddings is false in config.json")
            raise EngineError(f"{where}: tensor {name!r} is missing from the checkpoint")
        if tuple(t.shape) != shape:
            raise EngineError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shape}")
        if not t.is_floating_point():
            raise EngineError(f"{where}: tensor {name!r} has dtype {t.dtype}; a floating dtype is needed")
    dtypes = {t.dtype for n, t in tensors.items() if n in expected}
    if len(dtypes) > 1:
        raise EngineError(f"{where}: tensors have mixed dtypes {sorted(map(str, dtypes))}; pass dtype= to cast them")
    return formats


def quantize_plan(cfg: ModelShape, tensors: dict[str, torch.Tensor], quantize: str) -> dict[str, int]:
    """The float matrices ``quantize`` ("int8" | "int4") turns into integers, and their bits
    (``weights.quantized_bits``: the gateway sizes a model by the same rule). Matrices already
    quantized stay as they are."""
    plan: dict[str, int] = {}
    for name, shape in expected_shapes(cfg).items():
        t = tensors.get(name)
        bits = quantized_bits(name, shape, quantize) if t is not None and t.is_floating_point() else None
        if bits is not None:
            plan[name] = bits
    return plan


def _kinds(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[str, ...]:
    """How the matrix ``prefix`` is held: ("weight",) or its quantized parts."""
    if f"{prefix}.weight" in tensors:
        return ("weight",)
    return tuple(k for k in QUANT_SUFFIXES if f"{prefix}.{k}" in tensors)


def _groups(cfg: ModelShape, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, list[str] | None]:
    """The fusable groups of layer ``i``, one per kind ("qkv.weight", "qkv.scales", "qkv.bias",
    ...): their members' names in order; None where the members are held differently."""
    p = f"model.layers.{i}."
    out: dict[str, list[str] | None] = {}
    for key, parts, bias in (("qkv", [f"{p}self_attn.{n}_proj" for n in "qkv"], cfg.qkv_bias),
                             ("gate_up", [f"{p}mlp.{n}_proj" for n in ("gate", "up")], cfg.mlp_bias)):
        kinds = {_kinds(tensors, m) for m in parts}
        if len(kinds) != 1:
            out[key] = None
            continue
        for kind in (*kinds.pop(), *(("bias",) if bias else ())):
            out[f"{key}.{kind}"] = [f"{m}.{kind}" for m in parts]
    return out


def _adjacent(ts: list[torch.Tensor]) -> bool:
    """True if the tensors sit back to back, in order, in one storage."""
    t0 = ts[0]
    if not all(t.is_contiguous() and t.dtype == t0.dtype and t.device == t0.device and t.shape[1:] == t0.shape[1:]
               for t in ts):
        return False
    base = t0.untyped_storage().data_ptr()
    ptr = t0.data_ptr()
    for t in ts:
        if t.untyped_storage().data_ptr() != base or t.data_ptr() != ptr:
            return False
        ptr += t.numel() * t.element_size()
    return True


def _joined(ts: list[torch.Tensor]) -> torch.Tensor:
    """The view spanning adjacent tensors, concatenated along dim 0."""
    rows = sum(t.shape[0] for t in ts)
    shape = (rows, *ts[0].shape[1:])
    stride = tuple(ts[0].stride())
    return ts[0].as_strided(shape, stride)


def _regroup(tensors: dict[str, torch.Tensor], members: list[str], layer_names: list[str]) -> int:
    """Move ``members`` back to back (in order) inside the span of the arena they and their
    neighbours occupy. Returns the bytes moved, 0 if the span holds tensors of other layers or
    other storages (then nothing is touched)."""
    ts = [tensors[n] for n in members]
    t0 = ts[0]
    storage = t0.untyped_storage()
    base = storage.data_ptr()
    if any(t.untyped_storage().data_ptr() != base or not t.is_contiguous() or t.dtype != t0.dtype for t in ts):
        return 0

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr() - base
        return start, start + t.numel() * t.element_size()

    lo = min(span(t)[0] for t in ts)
    hi = max(span(t)[1] for t in ts)
    # every tensor of this storage that overlaps [lo, hi) must belong to this layer
    inside: list[str] = []
    for name, t in tensors.items():
        if t.untyped_storage().data_ptr() != base or t.numel() == 0:
            continue
        s, e = span(t)
        if e <= lo or s >= hi:
            continue
        if name not in layer_names or s < lo or e > hi or not t.is_contiguous():
            return 0
        inside.append(name)
    order = list(members) + sorted((n for n in inside if n not in members), key=lambda n: span(tensors[n])[0])
    region = torch.empty(0, dtype=torch.uint8, device=t0.device).set_(storage, lo, (hi - lo,), (1,))
    tmp = region.clone()
    offset = 0
    placed: dict[str, int] = {}
    for name in order:
        t = tensors[name]
        s, e = span(t)
        align = t.element_size()
        offset = (offset + align - 1) // align * align
        if offset + (e - s) > hi - lo:
            return 0  # cannot happen for tiling tensors; keep the arena as it was
        placed[name] = offset
        offset += e - s
    for name in order:
        s, e = span(tensors[name])
        region[placed[name] : placed[name] + (e - s)].copy_(tmp[s - lo : e - lo])
    for name in order:
        t = tensors[name]
        el = t.element_size()
        view = torch.empty(0, dtype=t.dtype, device=t.device)
        view.set_(storage, (lo + placed[name]) // el, tuple(t.shape), tuple(t.stride()))
        tensors[name] = view
    return hi - lo


def fusion_is_free(cfg: ModelShape, tensors: dict[str, torch.Tensor]) -> bool:
    """True if every fusable group already sits back to back (fusing needs no byte moved, so
    the weights may still be loading while the model is assembled)."""
    for i in range(cfg.num_layers):
        for members in _groups(cfg, i, tensors).values():
            if members is None or any(n not in tensors for n in members) or not _adjacent([tensors[n] for n in members]):
                return False
    return True


def layer_names(cfg: ModelShape, tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Tensor names each stage of the forward pass reads: [embed, layer 0, ..., layer N-1, head]."""
    embed = [n for n in tensors if n.startswith("model.embed_tokens.")]
    stages: list[list[str]] = [embed] + [[] for _ in range(cfg.num_layers)] + [[]]
    for name in tensors:
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if 0 <= i < cfg.num_layers:
                stages[1 + i].append(name)
        elif name not in embed:
            stages[-1].append(name)
    if cfg.tie_word_embeddings:
        stages[-1].extend(embed)
    return stages


def plan_fusion(cfg: ModelShape, tensors: dict[str, torch.Tensor], fuse: str, writable: bool) -> FusePlan:
    """Decide (and where allowed, make) the fused layout. May replace entries of ``tensors``
    with views of their regrouped bytes. ``writable``: the arena is private memory that may be
    rearranged (device memory always is; a CPU arena that maps the checkpoint file is not)."""
    plan = FusePlan(qkv=[False] * cfg.num_layers, gate_up=[False] * cfg.num_layers)
    if fuse == "never":
        plan.notes.append("fusion off")
        return plan
    for i in range(cfg.num_layers):
        groups = _groups(cfg, i, tensors)
        prefix = f"model.layers.{i}."
        layer_names = [n for n in tensors if n.startswith(prefix)]
        ok: dict[str, bool] = {}
        for key, members in groups.items():
            if members is None:
                ok[key] = False
                continue
            ts = [tensors[n] for n in members]
            if not _adjacent(ts):
                allowed = fuse == "always" or writable or ts[0].device.type != "cpu"
                if allowed:
                    plan.regrouped_bytes += _regroup(tensors, members, layer_names)
            ok[key] = _adjacent([tensors[n] for n in members])
        plan.qkv[i] = all(v for k, v in ok.items() if k.split(".")[0] == "qkv")
        plan.gate_up[i] = all(v for k, v in ok.items() if k.split(".")[0] == "gate_up")
    n_qkv, n_gu = sum(plan.qkv), sum(plan.gate_up)
    plan.notes.append(f"fused qkv in {n_qkv}/{cfg.num_layers} layers, gate/up in {n_gu}/{cfg.num_layers}")
    return plan


def state_dict(cfg: ModelShape, tensors: dict[str, torch.Tensor], plan: FusePlan) -> dict[str, torch.Tensor]:
    """The model's parameter name -> tensor (views of ``tensors``)."""
    return _mapping(cfg, tensors, plan)[0]


def _mapping(cfg: ModelShape, tensors: dict[str, torch.Tensor], plan: FusePlan) -> tuple[dict[str, torch.Tensor], Formats]:
    """The model's parameters (views of ``tensors``), and how each projection is held."""
    sd: dict[str, torch.Tensor] = {"norm.weight": tensors["model.norm.weight"]}
    formats: Formats = {}  # model prefix ("layers.0.attn.qkv") -> each part's format (None: floats)

    def proj(dst: str, srcs: list[str], fused: bool, bias: bool) -> None:
        fmts = [qformat(tensors, s) for s in srcs]
        kinds = [(*_kinds(tensors, s), *(("bias",) if bias else ())) for s in srcs]
        if fused or len(srcs) == 1:
            for kind in kinds[0]:
                ts = [tensors[f"{s}.{kind}"] for s in srcs]
                sd[f"{dst}.{kind}"] = ts[0] if len(ts) == 1 else _joined(ts)
            f0 = fmts[0]
            rows = sum(f.shape[0] for f in fmts if f is not None)
            formats[dst] = [None if f0 is None else QFormat(f0.bits, f0.group, f0.scale_dtype, f0.mins, (rows, f0.shape[1]),
                                                          f0.tiled)]
        else:
            for j, (s, ks) in enumerate(zip(srcs, kinds)):
                for kind in ks:
                    sd[f"{dst}.{kind}{j}"] = tensors[f"{s}.{kind}"]
            formats[dst] = fmts

    proj("embed", ["model.embed_tokens"], True, False)
    if not cfg.tie_word_embeddings:
        proj("lm_head", ["lm_head"], True, False)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        sd[dst + "input_norm.weight"] = tensors[src + "input_layernorm.weight"]
        sd[dst + "post_norm.weight"] = tensors[src + "post_attention_layernorm.weight"]
        proj(dst + "attn.qkv", [f"{src}self_attn.{n}_proj" for n in "qkv"], plan.qkv[i], cfg.qkv_bias)
        proj(dst + "attn.o", [src + "self_attn.o_proj"], True, cfg.o_bias)
        if cfg.qk_norm:
            sd[dst + "attn.q_norm.weight"] = tensors[src + "self_attn.q_norm.weight"]
            sd[dst + "attn.k_norm.weight"] = tensors[src + "self_attn.k_norm.weight"]
        proj(dst + "mlp.gate_up", [f"{src}mlp.{n}_proj" for n in ("gate", "up")], plan.gate_up[i], cfg.mlp_bias)
        proj(dst + "mlp.down", [src + "mlp.down_proj"], True, cfg.mlp_bias)
    return sd, formats


@dataclass
class Assembled:
    """The model built over the arena's tensors, and how."""

    model: Any  # the Transformer
    plan: FusePlan
    max_len: int
    overlap: bool  # the weights are still arriving: each stage waits for its layer's tensors
    arena: Any  # the arena the model views (a new one when quantized at load)


def assemble(cfg: ModelShape, arena: Any, config: Any, dtype: torch.dtype, dev: torch.device, where: str,
             allocator: Any = None) -> Assembled:
    """The Transformer over ``arena``'s tensors (fused where free or allowed), on the meta device
    first so that no parameter is allocated twice. While the load is still running (only when
    fusion moves no byte) each stage of the forward pass waits for its own layer."""
    check(cfg, arena.tensors, where)
    plan_q = quantize_plan(cfg, arena.tensors, config.quantize)
    if plan_q:  # float matrices quantized at load: into a new arena, the float one let go
        arena = quantize_arena(arena, plan_q, allocator)
    tensors = arena.tensors
    quantized = check(cfg, tensors, where)
    tiled = 0
    if dev.type == "cpu" and any(not f.tiled for f in quantized.values()) and getattr(arena, "writable", False):
        arena.wait()  # the CPU kernels' tiles: the same bytes reordered in place (an image holds them so)
        tiled = _kernels.tile_matrices(tensors, quantized)
        quantized = check(cfg, tensors, where)
    overlap = config.overlap_load and not arena.done and fusion_is_free(cfg, tensors)
    if not overlap:
        arena.wait()  # fusion may move bytes, which must have arrived
    plan = plan_fusion(cfg, tensors, config.fuse, bool(getattr(arena, "writable", False)))
    sd, formats = _mapping(cfg, tensors, plan)
    if quantized:
        plan.notes.append(_quant_note(quantized, dev) + (f"; tiled {tiled / 1e6:.1f} MB in place" if tiled else ""))
    with torch.device("meta"):
        model = Transformer(cfg, plan.qkv, plan.gate_up, formats)
    model.load_state_dict(sd, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    max_len = config.max_model_len or min(cfg.max_position_embeddings, MAX_MODEL_LEN_CAP)
    model.cos, model.sin = cos_sin_table(cfg.rope, cfg.head_dim, max_len + 1, dtype, dev)
    model.eval()
    if overlap:
        stages = layer_names(cfg, tensors)
        model.wait_stage = lambda i: arena.wait(stages[i + 1])
    return Assembled(model, plan, max_len, overlap, arena)


def _quant_note(formats: dict[str, QFormat], dev: torch.device) -> str:
    """"quantized: 210 x int4 g32 +min, 1 x int8 g32 (qmm avx512)": what the matrices are held in."""
    counts = Counter(f.describe() for f in formats.values())
    held = ", ".join(f"{n} x {d}" for d, n in counts.most_common())
    return f"quantized: {held} ({_kernels.prepare(dev)})"
