"""Quantized matrices held as the engine holds them (``weights.QFormat``): every GGUF type kept
quantized gives the values ``gguf.quants`` dequantizes (within one float32 rounding: the
engine computes ``scale * q + min``, the reference ``d * (q - 8)`` and the like), and
float matrices quantized at load stay within half a step of their group."""

from __future__ import annotations

import pytest
import torch

from tests.weights._gguf_files import gguf_name, random_llama, write_gguf
from tests.weights.test_gguf import _reference
from zerostart import weights
from zerostart.weights import QFormat

gguf = pytest.importorskip("gguf")
KEPT = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from zerostart.engine.demo import write_demo_model

    return write_demo_model(str(tmp_path_factory.mktemp("demo") / "tiny"), size="tiny")


@pytest.mark.parametrize("qtype", KEPT + ["Q2_K", "Q3_K"])
def test_kept_quantized_is_the_reference_dequantization(tmp_path, tiny, qtype):
    """K-quants are random blocks (the package cannot quantize them); the others quantized by it."""
    model, cfg = random_llama(tiny, hidden_size=256, intermediate_size=256, head_dim=64, num_hidden_layers=2)
    path = write_gguf(str(tmp_path / f"{qtype}.gguf"), cfg, model.state_dict(), tiny, qtype=qtype)
    arena = weights.load_arena(path, keep_quantized=True)
    ref = _reference(path)
    held = 0
    for name, shape in ((n, tuple(t.shape)) for n, t in model.state_dict().items()):
        prefix = name.removesuffix(".weight")
        fmt = weights.qformat(arena.tensors, prefix) if name.endswith(".weight") else None
        if qtype in ("Q2_K", "Q3_K") or len(shape) == 1:  # held as floats
            assert fmt is None and name in arena.tensors, name
            continue
        assert fmt is not None and fmt.shape == shape, name
        held += 1
        parts = [arena.tensors[f"{prefix}.{k}"] for k in weights.QUANT_SUFFIXES if f"{prefix}.{k}" in arena.tensors]
        got = weights.dequantize(*parts) if len(parts) == 3 else weights.dequantize(parts[0], parts[1], None)
        expect = ref[gguf_name(name)]
        torch.testing.assert_close(got, expect, rtol=2e-7, atol=2e-7 * expect.abs().max().item(), msg=name)
    matrices = sum(1 for t in model.state_dict().values() if t.dim() == 2)
    assert held == (0 if qtype in ("Q2_K", "Q3_K") else matrices)
    # the fused groups' parts sit back to back per kind: fusing them moves no byte
    t = arena.tensors
    for kind in ("qweight", "scales") if held else ("weight",):
        q, k, v = (t[f"model.layers.0.self_attn.{n}_proj.{kind}"] for n in "qkv")
        assert k.data_ptr() == q.data_ptr() + q.nbytes and v.data_ptr() == k.data_ptr() + k.nbytes, kind


def test_formats_of_every_kept_type():
    expect = {"Q8_0": (8, 32, torch.float16, False), "Q4_0": (4, 32, torch.float16, True),
              "Q4_1": (4, 32, torch.float16, True), "Q5_0": (8, 32, torch.float16, False),
              "Q5_1": (8, 32, torch.float16, True), "Q4_K": (4, 32, torch.float32, True),
              "Q5_K": (8, 32, torch.float32, True), "Q6_K": (8, 16, torch.float32, False)}
    from zerostart.weights._quant import gguf_qformat

    for qtype, (bits, group, sdt, mins) in expect.items():
        assert gguf_qformat(qtype, (64, 256)) == QFormat(bits, group, sdt, mins, (64, 256))
    assert gguf_qformat("Q4_1", (256,)) is None and gguf_qformat("F16", (64, 256)) is None


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_stays_within_half_a_step(bits):
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different ranges
    parts = weights.quantize(w, bits)
    got = weights.dequantize(parts["qweight"], parts["scales"], parts.get("mins"))
    step = parts["scales"].float().repeat_interleave(32, dim=1)
    # half a step, plus the float16 rounding of the min (int4) and of the step itself
    slack = 0.5 * step + (parts["mins"].float().abs().repeat_interleave(32, dim=1) * 2**-10 if bits == 4 else 0)
    assert bool(((got - w).abs() <= slack * (1 + 1e-3) + 1e-6).all())
    assert parts["qweight"].dtype == (torch.int8 if bits == 8 else torch.uint8)


def test_quantize_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="groups of 32"):
        weights.quantize(torch.randn(4, 48), 8)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        weights.quantize(torch.randn(4, 64), 3)


def test_qformat_names_the_matrix_whose_parts_disagree():
    t = {"a.qweight": torch.zeros(8, 16, dtype=torch.uint8), "a.scales": torch.zeros(8, 3, dtype=torch.float16)}
    with pytest.raises(ValueError, match="a.scales"):
        weights.qformat(t, "a")
    t["a.scales"] = torch.zeros(8, 1, dtype=torch.float16)
    t["a.mins"] = torch.zeros(8, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="a.mins"):
        weights.qformat(t, "a")
    assert weights.qformat({"b.weight": torch.zeros(2, 2)}, "b") is None


def test_quantize_arena_keeps_the_rest_and_orders_the_parts(tmp_path, tiny):
    arena = weights.load_arena(tiny, dtype="float32")
    plan = {n: 4 for n, t in arena.tensors.items() if n.endswith("proj.weight")}
    q = weights.quantize_arena(arena, plan)
    assert q.done and q.nbytes < arena.nbytes
    for name, t in arena.tensors.items():
        if name in plan:
            assert name not in q.tensors and weights.qformat(q.tensors, name.removesuffix(".weight")) is not None
        else:
            assert torch.equal(q.tensors[name], t), name
    qk = [q.tensors[f"model.layers.0.self_attn.{n}_proj.qweight"] for n in "qk"]
    assert qk[1].data_ptr() == qk[0].data_ptr() + qk[0].nbytes
    assert q.stats.arena_bytes <= q.nbytes and q.stats.strategy.get("quantize") == 1
