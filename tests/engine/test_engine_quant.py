"""The engine over quantized matrices: the kernels against float references, the quantized
engine against the dequantized one on the same GGUF file, quantizing at load, and the ready
image and parking carrying the quantized form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.weights._gguf_files import random_llama, write_gguf
from zerostart import snapshot, weights
from zerostart.engine import Engine, EngineConfig, SamplingParams
from zerostart.engine import _kernels
from zerostart.engine._kernels import _build
from zerostart.weights import QFormat

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
# fp32 sums in another order than float64's: relative to the largest output
KERNEL_RTOL = 2e-6


@pytest.fixture(scope="module")
def kernels():
    """The built CPU kernels (``make setup`` builds them; built here if missing)."""
    assert _build.load(build=True), _build.why_not()


def _random_q(bits: int, group: int, sdt: torch.dtype, mins: bool, N: int = 80, K: int = 256):
    g = torch.Generator().manual_seed(bits * 100 + group)
    if bits == 4:
        qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    else:
        qw = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    sc = (torch.rand(N, K // group, generator=g) * 0.02).to(sdt)
    mn = (torch.randn(N, K // group, generator=g) * 0.02).to(sdt) if mins else None
    return qw, sc, mn


FORMATS = [(4, 32, torch.float16, True), (4, 32, torch.float32, True), (8, 32, torch.float16, False),
           (8, 32, torch.float32, True), (8, 16, torch.float32, False)]


def _fmt(qw, sc, mn, tiled=False) -> QFormat:
    bits = 4 if qw.dtype == torch.uint8 else 8
    K = qw.shape[1] * (2 if bits == 4 else 1)
    return QFormat(bits, K // sc.shape[1], sc.dtype, mn is not None, (qw.shape[0], K), tiled)


def _parts(qw, sc, mn):
    return [qw, sc] + ([mn] if mn is not None else [])


def _tiled(qw, sc, mn):
    fmt = _fmt(qw, sc, mn)
    return list(_kernels.ops.tile(qw, sc, mn, fmt.bits, fmt.group)), fmt.tiles()


def _int8_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as the tiled kernel sees it: int8 per group of ``group`` with a float scale (round half
    to even, as the kernel's nearbyint), computed in float32 as the kernel computes it (x times
    127 / amax: dividing by amax / 127 instead rounds a value on a half the other way now and then)."""
    g = x.float().view(x.shape[0], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / torch.where(amax > 0, amax, 1), 0)  # 127 / t is 127 * (1 / t)
    q = torch.round(g * inv)
    return (q.double() * (amax / 127).double()).view(x.shape)


@pytest.mark.parametrize("bits,group,sdt,mins", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 33, 70])
def test_linear_is_the_float_reference(kernels, bits, group, sdt, mins, rows):
    """Each batch regime of the row layout (in-register kernel up to DECODE_ROWS, dequantize +
    BLAS beyond)."""
    qw, sc, mn = _random_q(bits, group, sdt, mins)
    x = torch.randn(rows, qw.shape[1] * (2 if bits == 4 else 1))
    bias = torch.randn(qw.shape[0])
    w = weights.dequantize(qw, sc, mn).double()
    ref = F.linear(x.double(), w, bias.double())
    got = _kernels.linear(x, _parts(qw, sc, mn), _fmt(qw, sc, mn), bias)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got.double() - ref).abs().max().item() <= KERNEL_RTOL * ref.abs().max().item()
    # the kernel's own unpacking is the reference's
    unpacked = _kernels.ops.dequant(qw, sc, mn, bits, group)
    torch.testing.assert_close(unpacked, w.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits,group,sdt,mins", FORMATS)
@pytest.mark.parametrize("rows", [1, 4, 5, 16, 32, 70])
def test_tiled_linear_is_the_reference_on_int8_activations(kernels, bits, group, sdt, mins, rows):
    """The tiled kernel multiplies x rounded to int8 per group (as llama.cpp does), at every
    batch size: exact against that rounding, and within the rounding's own error of float x."""
    qw, sc, mn = _random_q(bits, group, sdt, mins)
    parts, fmt = _tiled(qw, sc, mn)
    x = torch.randn(rows, fmt.shape[1], generator=torch.Generator().manual_seed(rows))
    w = weights.dequantize(qw, sc, mn).double()
    torch.testing.assert_close(weights.dequantize(*parts[:2], parts[2] if mins else None, tiled=True), w.float())
    got = _kernels.linear(x, parts, fmt).double()
    exact = F.linear(x.double(), w)
    ref = F.linear(_int8_rows(x, group), w)
    assert (got - ref).abs().max().item() <= KERNEL_RTOL * ref.abs().max().item()
    assert (got - exact).abs().max().item() <= 2e-2 * exact.abs().max().item()
    untiled = _kernels.ops.untile(*parts[:2], parts[2] if mins else None, bits, group)
    torch.testing.assert_close(untiled, w.float(), rtol=1e-6, atol=1e-7)
    # an embedding lookup reads the tiles' rows
    ids = torch.tensor([0, 17, 5, qw.shape[0] - 1])
    torch.testing.assert_close(_kernels.rows(ids, parts, fmt, torch.float32), w.float()[ids])


def test_tile_matrices_rewrites_in_place(kernels):
    qw, sc, mn = _random_q(4, 32, torch.float16, True)
    t = {"a.qweight": qw.clone(), "a.scales": sc.clone(), "a.mins": mn.clone()}
    ptrs = {k: v.data_ptr() for k, v in t.items()}
    assert _kernels.tile_matrices(t, {"a.weight": _fmt(qw, sc, mn)}) == qw.nbytes + sc.nbytes + mn.nbytes
    assert sorted(t) == ["a.mtiles", "a.qtiles", "a.stiles"]
    assert [t["a.qtiles"].data_ptr(), t["a.stiles"].data_ptr(), t["a.mtiles"].data_ptr()] == list(ptrs.values())
    assert weights.qformat(t, "a") == _fmt(qw, sc, mn).tiles()


def test_linear_keeps_bfloat16_activations(kernels):
    qw, sc, mn = _random_q(4, 32, torch.float16, True)
    x = torch.randn(2, 256).bfloat16()
    got = _kernels.linear(x, _parts(qw, sc, mn), _fmt(qw, sc, mn))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x.float(), weights.dequantize(qw, sc, mn)), rtol=1e-2, atol=1e-2)


def test_the_portable_path_without_kernels_gives_the_same(kernels, monkeypatch):
    qw, sc, mn = _random_q(8, 32, torch.float16, False)
    x = torch.randn(4, 256)
    fast = _kernels.linear(x, _parts(qw, sc, mn), _fmt(qw, sc, mn))
    parts, fmt = _tiled(qw, sc, mn)
    monkeypatch.setattr(_build, "load", lambda build=False: False)
    assert _kernels.kernel(torch.device("cpu")).startswith("torch dequantize")
    torch.testing.assert_close(_kernels.linear(x, _parts(qw, sc, mn), _fmt(qw, sc, mn)), fast, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_kernels.linear(x, parts, fmt), fast, rtol=1e-5, atol=1e-5)  # tiles read back by torch


def test_the_kernel_refuses_mismatched_parts(kernels):
    qw, sc, mn = _random_q(4, 32, torch.float16, True)
    with pytest.raises(RuntimeError, match="qmm"):
        _kernels.ops.qmm(torch.randn(1, 128), qw, sc, mn, 4, 32)  # K of x is not the matrix's


@pytest.fixture(scope="module")
def gguf_pair(tiny_dir, tmp_path_factory):
    """A tiny random model as a Q4_1 GGUF file (embeddings Q8_0, as llama.cpp's Q4_1 files hold
    them): the engine holding it quantized, and the engine holding it dequantized."""
    model, cfg = random_llama(tiny_dir, hidden_size=128, intermediate_size=256, head_dim=32,
                              num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    sd = model.state_dict()
    d = tmp_path_factory.mktemp("gguf")
    path = write_gguf(str(d / "q41.gguf"), cfg, {n: t for n, t in sd.items()}, tiny_dir, qtype="Q4_1")
    q = Engine.from_pretrained(path, dtype="float32", config=EngineConfig(max_num_seqs=4))
    f = Engine.from_pretrained(path, dtype="float32", config=EngineConfig(max_num_seqs=4, quantize="none"))
    return path, q, f


def _tokens(engine, prompt="hello world, this is a test"):
    return [ev.token_id for ev in engine.generate(prompt, GREEDY) if ev.token_id is not None]


def test_a_gguf_file_stays_quantized_and_answers_as_dequantized(kernels, gguf_pair):
    """The same weights; the tiled kernel rounds activations to int8 per group, so the logits
    are close to the dequantized engine's, not equal."""
    _, q, f = gguf_pair
    assert q.arena.nbytes < f.arena.nbytes / 3
    assert any("quantized:" in n and "int4 g32 +min" in n and "tiled" in n for n in q.fusion.notes), q.fusion.notes
    assert all(q.fusion.qkv) and all(q.fusion.gate_up)
    assert "model.layers.0.self_attn.q_proj.qtiles" in q.arena.tensors
    for text in ("the quick", "the quick brown fox jumps over, and then some more words for a longer prompt"):
        ids = q.tokenizer.encode(text)
        lq, lf = q.logits(ids), f.logits(ids)
        assert (lq - lf).abs().max().item() <= 5e-2 * lf.abs().max().item(), text


@pytest.mark.parametrize("mode,tol", [("int8", 0.05), ("int4", 0.5)])
def test_quantize_at_load(kernels, tiny_dir, tiny_engine, mode, tol):
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=2, quantize=mode))
    assert e.arena.nbytes < tiny_engine.arena.nbytes / (3 if mode == "int8" else 4)
    held = [n for n in e.arena.tensors if n.endswith((".qweight", ".qtiles"))]
    assert len(held) == 7 * tiny_engine.model_config.num_layers + 1 + (not tiny_engine.model_config.tie_word_embeddings)
    assert e.arena.tensors["model.embed_tokens.qtiles"].dtype == torch.int8  # the embeddings at 8 bits always
    ids = e.tokenizer.encode("hello there")
    lq, lf = e.logits(ids), tiny_engine.logits(ids)
    assert (lq - lf).abs().max().item() <= tol * lf.abs().max().item()


def test_quantize_setting_is_checked():
    from zerostart.engine import EngineError

    with pytest.raises(EngineError, match="quantize"):
        EngineConfig(quantize="int3")  # type: ignore[arg-type]  # what a caller without a type checker may pass


def test_the_image_holds_the_quantized_form(kernels, tiny_dir, tmp_path):
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=2, quantize="int4"))
    fp = snapshot.fingerprint(tiny_dir, "cpu", "float32", "int4")
    out = snapshot.write_engine_image(e, tiny_dir, str(tmp_path / "img"), fp)
    m = snapshot.read_manifest(out)
    assert m["fingerprint"]["quantize"] == "int4"
    assert m["weights"]["quantized"] == {"int4 g32 +min": 7 * e.model_config.num_layers, "int8 g32": 1 + (not e.model_config.tie_word_embeddings)}
    assert "model.layers.0.mlp.down_proj.qtiles" in e.arena.tensors  # the image holds the kernel's tiles
    back = Engine.from_pretrained(out)  # the image brings its dtype and its quantization
    assert back.arena.nbytes <= e.arena.nbytes + 4096 * 64
    for name, t in e.arena.tensors.items():
        assert back.arena.tensors[name].dtype == t.dtype and torch.equal(back.arena.tensors[name], t), name
    assert _tokens(back) == _tokens(e)
    assert back.fusion.regrouped_bytes == 0 and all(back.fusion.qkv)
    from zerostart.engine import EngineError

    with pytest.raises(EngineError, match="quantize"):  # asked for floats, the image holds int4
        Engine.from_pretrained(out, config=EngineConfig(quantize="none"))


def test_parking_keeps_the_quantized_weights(kernels, gguf_pair):
    _, q, _ = gguf_pair
    before = _tokens(q)
    parking = snapshot.EngineParking(q)
    parking.park()
    assert parking.weights.host_bytes == q.weights_storage.numel()
    parking.wake()
    assert _tokens(q) == before


@pytest.mark.gpu
def test_cuda_quantized_linear_matches_cpu():
    """CUDA holds the same formats; its matmul dequantizes with torch (bf16 activations)."""
    for bits, group, sdt, mins in FORMATS:
        qw, sc, mn = _random_q(bits, group, sdt, mins)
        x = torch.randn(5, qw.shape[1] * (2 if bits == 4 else 1))
        ref = F.linear(x.double(), weights.dequantize(qw, sc, mn).double())
        got = _kernels.linear(x.cuda().bfloat16(), [p.cuda() for p in _parts(qw, sc, mn)], _fmt(qw, sc, mn))
        assert got.dtype == torch.bfloat16
        assert (got.double().cpu() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


@pytest.mark.gpu
def test_cuda_engine_holds_a_gguf_file_quantized(gguf_pair):
    path, _, f = gguf_pair
    e = Engine.from_pretrained(path, device="cuda", dtype="float32", config=EngineConfig(max_num_seqs=2))
    assert any("quantized:" in n for n in e.fusion.notes)
    ids = e.tokenizer.encode("the quick brown fox")
    assert (e.logits(ids).cpu() - f.logits(ids)).abs().max().item() <= 1e-3 * f.logits(ids).abs().max().item()
