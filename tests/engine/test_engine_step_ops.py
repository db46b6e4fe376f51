"""The step's fused CPU ops (``_kernels.ops``) against the torch reference the model runs
without them: float32 to float sums' order, bfloat16 to its rounding; strided views as the
model passes them (q, k, v split from one projection), gathered and dense decode rows, sliding
windows, grouped heads, head sizes off the vector width."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from zerostart.engine import Engine, EngineConfig, EngineError, SamplingParams
from zerostart.engine._kernels import _build, ops
from zerostart.engine._model import RMSNorm, _rotate
from zerostart.engine._runner import ModelRunner

from tests.engine._steps import step_logits

DTYPES = [torch.float32, torch.bfloat16]
# (activations, KV cache): a model of float32 activations over quantized weights keeps a bfloat16 cache
WITH_CACHE = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert _build.load(build=True), _build.why_not()


def test_the_kernels_run_on_torchs_threads():
    """The library's loops are split over ATen's threads (built with OpenMP: without it every
    loop ran on one thread whatever ``threads`` said)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ops.parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert ops.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(before)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    if want.dtype == torch.bfloat16:  # one rounding apart at most
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = (torch.rand(96, generator=g) + 0.5).to(dtype)
    wide = torch.randn(5, 200, generator=g).to(dtype)
    x = wide[:, 10:106]  # a strided view, as a split projection's output is
    r = torch.randn(5, 96, generator=g).to(dtype)
    want_h = x + r
    y, h = ops.add_rms_norm(x, r, norm.weight, norm.eps)
    assert torch.equal(h, want_h)
    _close(y, norm(want_h))
    y0, same = ops.add_rms_norm(x, None, norm.weight, norm.eps)
    _close(y0, norm(x))
    assert same.data_ptr() == x.data_ptr()  # no residual: x itself is the stream


@pytest.mark.parametrize("dtype,cache", WITH_CACHE)
@pytest.mark.parametrize("D", [64, 24])
def test_rope_write_rotates_in_place_and_writes_decode_rows(dtype, cache, D):
    g = torch.Generator().manual_seed(1)
    T, H, KH, P, slots = 5, 6, 2, 40, 4
    qkv = torch.randn(T, (H + 2 * KH) * D, generator=g).to(dtype)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KH * D, KH * D], dim=-1))
    cos = torch.randn(P, D, generator=g).to(dtype)
    sin = torch.randn(P, D, generator=g).to(dtype)
    pos = torch.tensor([3, 17, 0, 5, 6])
    rows_cos, rows_sin = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    want_q, want_k, want_v = _rotate(q, rows_cos, rows_sin), _rotate(k, rows_cos, rows_sin), v.clone()
    kc = torch.zeros(slots, KH, P, D, dtype=cache)
    vc = torch.zeros(slots, KH, P, D, dtype=cache)
    kv_slots, kv_pos = torch.tensor([2, 0]), torch.tensor([3, 17])  # two decode rows; the rest prefill
    ops.rope_write_(q, k, v, cos, sin, pos, kc, vc, kv_slots, kv_pos)
    _close(q, want_q)
    _close(k, want_k)
    for row, (s, p) in enumerate([(2, 3), (0, 17)]):
        assert torch.equal(kc[s, :, p], k[row].to(cache)) and torch.equal(vc[s, :, p], want_v[row].to(cache))
    assert int((kc != 0).any(-1).sum()) == 2 * KH  # nothing else written
    with pytest.raises(RuntimeError, match="out of the cache"):
        ops.rope_write_(q, k, v, cos, sin, pos, kc, vc, torch.tensor([slots, 0]), kv_pos)


def _sdpa_decode(q, kc, vc, slots, lens, window, scale):
    """The model's torch path: masks, the group's query heads as rows of their KV head."""
    nd, H, D = q.shape
    KH = kc.shape[1]
    L = int(lens.max())
    kd, vd = kc[:, :, :L].index_select(0, slots), vc[:, :, :L].index_select(0, slots)
    keys = torch.arange(L)[None, :]
    m = keys < lens[:, None]
    if window is not None:
        m = m & (keys >= lens[:, None] - window)
    o = F.scaled_dot_product_attention(q.view(nd, KH, H // KH, D), kd, vd, attn_mask=m[:, None, None, :], scale=scale)
    return o.reshape(nd, H * D)


@pytest.mark.parametrize("dtype,cache", WITH_CACHE)
@pytest.mark.parametrize("D,window", [(64, None), (64, 5), (24, None), (24, 3)])
def test_decode_attention(dtype, cache, D, window):
    g = torch.Generator().manual_seed(2)
    H, KH, S, P = 6, 2, 5, 33
    kc = torch.randn(S, KH, P, D, generator=g).to(cache)
    vc = torch.randn(S, KH, P, D, generator=g).to(cache)
    q = torch.randn(3, H + 1, D, generator=g).to(dtype)[:, :H]  # strided rows
    lens = torch.tensor([1, 20, 33])
    scale = D ** -0.5
    gathered = torch.tensor([4, 0, 2])
    got = ops.decode_attention(q, kc, vc, gathered, lens, window or -1, scale)
    assert got.dtype == dtype
    _close(got, _sdpa_decode(q, kc.to(dtype), vc.to(dtype), gathered, lens, window, scale))
    dense = ops.decode_attention(q, kc, vc, None, lens, window or -1, scale)  # row i reads slot i
    _close(dense, _sdpa_decode(q, kc.to(dtype), vc.to(dtype), torch.arange(3), lens, window, scale))
    with pytest.raises(RuntimeError, match="out of the cache"):
        ops.decode_attention(q, kc, vc, None, torch.tensor([1, 20, P + 1]), -1, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    g = torch.Generator().manual_seed(3)
    gu = (torch.randn(4, 2 * 100, generator=g) * 6).to(dtype)  # 100: a tail past the vector width
    gu[0, :3] = torch.tensor([-200.0, 90.0, 0.0]).to(dtype)  # exp's clamps
    gate, up = gu.split(100, dim=-1)
    _close(ops.silu_mul(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize("K", [576, 100])  # 100: the portable loop
@pytest.mark.parametrize("M", [1, 3, 4])
def test_mv_bf16(M, K):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(70, K, generator=g).bfloat16()
    b = torch.randn(70, generator=g).bfloat16()
    want = (x.float() @ w.float().T + b.float()).bfloat16()  # float sums, rounded once
    torch.testing.assert_close(ops.mv_bf16(x, w, b).float(), want.float(), rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(ops.mv_bf16(x, w, None).float(), F.linear(x, w).float(), rtol=1.6e-2, atol=1e-2)


def _tokens(handle) -> list[int]:
    out = []
    while (ev := handle.get(0)) is not None:
        out.append(ev.token_id)
    return out


def _greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """The greedy tokens of ``prompts`` run together (stepped here: prefills beside decodes)."""
    handles = [engine.submit(p, GREEDY) for p in prompts]
    while not all(h.finished for h in handles):
        engine.step()
    return [_tokens(h) for h in handles]


def test_the_engine_runs_the_kernels_and_they_agree_with_torch(tiny_dir):
    """Greedy tokens with the fused ops equal the torch reference's: three sequences decoding
    together while a long prompt prefills in chunks beside them."""
    engine = Engine.from_pretrained(tiny_dir, dtype="float32",
                                    config=EngineConfig(max_model_len=256, max_num_seqs=4, prefill_chunk=16))
    assert engine.model.kernels  # the CPU with the kernels built: the default
    prompts = [[1, 2, 3], list(range(5, 40)), [7] * 9, [(i * 7) % 500 + 5 for i in range(100)]]

    fused = _greedy(engine, prompts)
    engine.model.use_kernels(False)
    assert _greedy(engine, prompts) == fused
    assert all(len(t) == GREEDY.max_tokens for t in fused)


@pytest.mark.parametrize("quantize,kv_dtype,held", [("none", "auto", "float32"), ("int8", "auto", "bfloat16"),
                                                    ("none", "bfloat16", "bfloat16"), ("int8", "float32", "float32")])
def test_the_kv_cache_dtype(tiny_dir, quantize, kv_dtype, held):
    """Float32 activations over quantized matrices keep their KV cache in bfloat16 (half the
    bytes), a float model's in its own dtype, unless ``kv_dtype`` says otherwise; the fused ops
    and the torch ops read and write it alike (greedy tokens equal); status says which."""
    config = EngineConfig(max_model_len=256, max_num_seqs=4, prefill_chunk=16, quantize=quantize, kv_dtype=kv_dtype)
    engine = Engine.from_pretrained(tiny_dir, dtype="float32", config=config)
    assert engine.kv.storage.dtype == getattr(torch, held) and engine.kv_stats().dtype == held
    prompts = [[1, 2, 3], list(range(5, 40)), [(i * 7) % 500 + 5 for i in range(60)]]

    fused = _greedy(engine, prompts)
    engine.model.use_kernels(False)
    assert _greedy(engine, prompts) == fused


def test_a_float16_cache_is_for_cuda(tiny_dir):
    with pytest.raises(EngineError, match="kv_dtype float16 is for CUDA"):
        Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_model_len=64, kv_dtype="float16"))


def _step_logits(engine: Engine, jobs: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """Every step's logits while ``jobs`` (prompt, tokens to generate) run greedily together."""
    return step_logits(engine, [(p, dataclasses.replace(GREEDY, max_tokens=n)) for p, n in jobs])


@pytest.mark.parametrize("dtype,quantize", [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"),
                                            ("bfloat16", "int4")])
def test_the_decode_stack_gives_the_layers_bits(tiny_dir, monkeypatch, dtype, quantize):
    """Steps of decode rows only run every layer in one library call (the decode stack); its
    logits equal, bit for bit, those of the model's layers running the same ops from Python:
    float weights (mv_bf16 at few bfloat16 rows, BLAS beyond) and tiled quantized ones, dense and
    gathered decode rows; steps with a prefill chunk beside run the layers."""
    engine = Engine.from_pretrained(tiny_dir, dtype=dtype, config=EngineConfig(
        max_model_len=256, max_num_seqs=8, prefill_chunk=16, quantize=quantize))
    model = engine.model
    assert model.stack  # the CPU with the kernels built: the default
    calls, gathered_calls = 0, 0
    make = type(model).decode_stack

    class Counted:  # the stack, its calls counted
        def __init__(self, stack):
            self.stack = stack

        def run(self, *args):
            nonlocal calls, gathered_calls
            calls += 1
            gathered_calls += args[8] is not None  # decode_slots: gathered rows
            return self.stack.run(*args)

    monkeypatch.setattr(type(model), "decode_stack", lambda self: Counted(make(self)))
    mixed = [([1, 2, 3], 12), (list(range(5, 40)), 12), ([7] * 9, 12), ([(i * 7) % 500 + 5 for i in range(60)], 12)]
    # six short ones finish, the last one decodes alone in slot 6: its rows are gathered
    gathered = [([i + 1, i + 2], 2) for i in range(6)] + [([9, 9, 9, 9], 12)]
    want = [_step_logits(engine, mixed), _step_logits(engine, gathered)]
    assert calls > 12 and gathered_calls >= 10  # decode-only steps ran the stack, gathered ones too
    model.use_kernels(True, stack=False)
    calls = 0
    got = [_step_logits(engine, mixed), _step_logits(engine, gathered)]
    assert calls == 0
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w) and all(torch.equal(a, b) for a, b in zip(g, w))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's imports
def test_compile_runs_torch_ops(tiny_engine):
    runner = ModelRunner(tiny_engine.model, tiny_engine.kv, torch.device("cpu"),
                         dataclasses.replace(tiny_engine.config, compile=True))
    try:
        assert not runner.model.kernels  # torch.compile traces the torch ops, not the library's
    finally:
        tiny_engine.model.use_kernels(True)
