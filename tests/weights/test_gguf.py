"""GGUF as a source: tensors as the gguf package dequantizes them, under Hugging Face names with
Q/K rows in Hugging Face order; the metadata as config and tokenizer files; malformed files
rejected with errors naming the file and the key or tensor (and fuzzed)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.weights._gguf_files import gguf_name, random_llama, write_gguf
from zerostart import weights
from zerostart.weights import WeightsError

gguf = pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from zerostart.engine.demo import write_demo_model

    return write_demo_model(str(tmp_path_factory.mktemp("demo") / "tiny"), size="tiny")


@pytest.fixture(scope="module")
def llama(tiny):
    return random_llama(tiny)


@pytest.fixture(scope="module")
def f32_file(tiny, llama, tmp_path_factory):
    model, cfg = llama
    return write_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"), cfg, model.state_dict(), tiny)


def _reference(path: str) -> dict[str, torch.Tensor]:
    """Every tensor as gguf.quants dequantizes it, with the converter's Q/K permutation undone
    the way transformers' GGUF loader undoes it."""
    from gguf.quants import dequantize

    r = gguf.GGUFReader(path)
    heads = int(r.fields["llama.attention.head_count"].contents())
    kv = int(r.fields["llama.attention.head_count_kv"].contents())
    out = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if "attn_q" in t.name else kv
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
        out[t.name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_tensors_are_the_reference_dequantization(tmp_path, tiny, llama, qtype):
    model, cfg = llama
    path = write_gguf(str(tmp_path / f"{qtype}.gguf"), cfg, model.state_dict(), tiny, qtype=qtype, small_qtype="F32")
    got = weights.load(path)
    ref = _reference(path)
    assert set(got) == set(model.state_dict())
    for name, t in got.items():
        assert t.dtype == (torch.float16 if qtype == "F16" and t.dim() == 2 else torch.float32)
        assert torch.equal(t.float(), ref[gguf_name(name)]), name
    # and close to the weights that were quantized (each type within its own error)
    err = max((got[n].float() - w).abs().max().item() for n, w in model.state_dict().items())
    assert err < {"F32": 1e-7, "F16": 1e-3, "Q8_0": 2e-3, "Q5_0": 2e-2, "Q5_1": 2e-2}.get(qtype, 5e-2), err


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_are_the_reference_dequantization(tmp_path, tiny, qtype):
    """The gguf package cannot quantize k-quants, so their blocks are random (finite scales):
    what is checked is that every block lands where the reference dequantization puts it."""
    model, cfg = random_llama(tiny, hidden_size=256, intermediate_size=256, head_dim=64, num_hidden_layers=1)
    path = write_gguf(str(tmp_path / f"{qtype}.gguf"), cfg, model.state_dict(), tiny, qtype=qtype)
    got = weights.load(path)
    ref = _reference(path)
    for name, t in got.items():
        torch.testing.assert_close(t, ref[gguf_name(name)], rtol=0, atol=0), name


@pytest.mark.parametrize("tied", [False, True])
def test_f32_gguf_is_the_original_model(tmp_path, tiny, llama, tied):
    """llama.cpp's layout undone exactly: an F32 GGUF of a transformers model gives its logits."""
    from zerostart.engine import Engine, EngineConfig

    model, cfg = llama
    sd = dict(model.state_dict())
    if tied:
        cfg = {**cfg, "tie_word_embeddings": True}
        sd.pop("lm_head.weight")
        model = type(model)(type(model.config)(**cfg)).float().eval()
        model.load_state_dict({**sd, "lm_head.weight": sd["model.embed_tokens.weight"]})
    path = write_gguf(str(tmp_path / "m.gguf"), cfg, sd, tiny)
    engine = Engine.from_pretrained(path, dtype="float32", config=EngineConfig(max_num_seqs=2))
    try:
        assert engine.model_config.tie_word_embeddings is tied
        assert engine.fusion.notes == ["fused qkv in 2/2 layers, gate/up in 2/2"]  # layer order: fused for free
        ids = engine.tokenizer.encode("Hello world, the cold start is short")
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(engine.logits(ids), ref, rtol=0, atol=1e-5)
    finally:
        engine.stop()


def test_metadata_becomes_config_and_tokenizer(f32_file, tiny, llama):
    from tokenizers import Tokenizer

    _, cfg = llama
    d = weights.localize(f32_file)
    with open(os.path.join(d, "config.json")) as f:
        got = json.load(f)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "vocab_size", "rms_norm_eps", "rope_theta"):
        assert got[key] == cfg[key], key
    assert got["architectures"] == ["LlamaForCausalLM"] and got["tie_word_embeddings"] is False
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    with open(os.path.join(tiny, "tokenizer_config.json")) as f:
        want = json.load(f)
    assert tok_cfg["chat_template"] == want["chat_template"] and tok_cfg["bos_token"] == want["bos_token"]
    mine, orig = Tokenizer.from_file(os.path.join(d, "tokenizer.json")), Tokenizer.from_file(os.path.join(tiny, "tokenizer.json"))
    for text in ("Hello world, the model is fast.", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", " 12 é"):
        assert mine.encode(text).ids == orig.encode(text).ids, text
        assert mine.decode(mine.encode(text).ids, skip_special_tokens=False) == orig.decode(orig.encode(text).ids, skip_special_tokens=False)


def test_the_table_is_written_once_per_file(f32_file, tmp_path):
    copy = str(tmp_path / "copy.gguf")
    shutil.copyfile(f32_file, copy)
    first = weights.open_gguf(copy)
    table = os.path.join(first.dir, "gguf-tensors.json")
    written = os.stat(table).st_mtime_ns
    assert weights.open_gguf(copy).dir == first.dir and os.stat(table).st_mtime_ns == written
    with open(copy, "r+b") as f:  # rewritten in place, same size: a new identity, a new table
        f.seek(-4, os.SEEK_END)
        f.write(bytes(4))
    changed = weights.open_gguf(copy)
    assert changed.identity != first.identity and changed.dir != first.dir


def test_convert_gguf_writes_a_checkpoint_transformers_loads(f32_file, llama, tmp_path):
    import transformers

    model, _ = llama
    out = weights.convert_gguf(f32_file, str(tmp_path / "hf"), dtype="float32")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 200, 300]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(WeightsError, match="exists and is not empty"):
        weights.convert_gguf(f32_file, out)


# -- malformed files ---------------------------------------------------------------------------


def test_bad_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(WeightsError, match=r"x.gguf: not a GGUF file \(it starts with b'GGML'"):
        weights.open_gguf(str(p))


def test_truncated_tensor_data_names_the_tensor(f32_file, tmp_path):
    p = tmp_path / "cut.gguf"
    with open(f32_file, "rb") as f:
        p.write_bytes(f.read()[:-5000])
    with pytest.raises(WeightsError, match=r"cut.gguf: tensor 'output.weight' \(F32\) needs bytes .*\(truncated\)"):
        weights.open_gguf(str(p))


def _patch_type(src: str, dst: str, tensor: str, new_type: int) -> None:
    """Copy ``src`` with ``tensor``'s type number replaced in its tensor info."""
    r = gguf.GGUFReader(src)
    field = next(t.field for t in r.tensors if t.name == tensor)
    name_len, name, n_dims, dims = field.parts[:4]
    at = field.offset + name_len.nbytes + name.nbytes + n_dims.nbytes + dims.nbytes
    with open(src, "rb") as f:
        data = bytearray(f.read())
    data[at : at + 4] = int(new_type).to_bytes(4, "little")
    with open(dst, "wb") as f:
        f.write(bytes(data))


def test_unknown_quant_type_names_the_tensor(f32_file, tmp_path):
    _patch_type(f32_file, str(tmp_path / "t.gguf"), "blk.1.ffn_up.weight", 99)
    with pytest.raises(WeightsError, match=r"t.gguf: tensor 'blk.1.ffn_up.weight' has unknown quantization type 99"):
        weights.open_gguf(str(tmp_path / "t.gguf"))


def test_unsupported_quant_type_names_the_tensor(f32_file, tmp_path):
    _patch_type(f32_file, str(tmp_path / "t.gguf"), "blk.0.ffn_down.weight", int(gguf.GGMLQuantizationType.I8))
    with pytest.raises(WeightsError, match=r"t.gguf: tensor 'blk.0.ffn_down.weight' is I8, which zerostart cannot dequantize"):
        weights.open_gguf(str(tmp_path / "t.gguf"))


def test_unsupported_architecture_names_the_key(tmp_path, tiny, llama):
    model, cfg = llama
    p = write_gguf(str(tmp_path / "g.gguf"), cfg, model.state_dict(), tiny, arch="gpt2")
    with pytest.raises(WeightsError, match=r"g.gguf: general.architecture is 'gpt2', which zerostart does not run"):
        weights.load(p)


def test_missing_key_is_named(tmp_path, tiny, llama):
    model, cfg = llama
    p = write_gguf(str(tmp_path / "g.gguf"), cfg, model.state_dict(), tiny, skip=("llama.embedding_length",))
    with pytest.raises(WeightsError, match=r"g.gguf: metadata key 'llama.embedding_length' is missing"):
        weights.localize(p)


def test_unknown_pre_tokenizer_is_named(tmp_path, tiny, llama):
    model, cfg = llama
    p = write_gguf(str(tmp_path / "g.gguf"), cfg, model.state_dict(), tiny, pre="klingon")
    with pytest.raises(WeightsError, match=r"'tokenizer.ggml.pre' is 'klingon', a pre-tokenizer zerostart does not know"):
        weights.localize(p)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, tiny, llama):
    """A small valid GGUF (one layer, a 64-token vocabulary cut from the tiny one) to mutate."""
    model, cfg = llama
    cfg = {**cfg, "num_hidden_layers": 1}
    sd = {n: t for n, t in model.state_dict().items() if ".layers.1." not in n}
    with open(write_gguf(str(tmp_path_factory.mktemp("small") / "s.gguf"), cfg, sd, tiny, qtype="Q8_0"), "rb") as f:
        return f.read()


def _open_or_reject(tmp_path, blob: bytes) -> None:
    p = tmp_path / "f.gguf"
    p.write_bytes(blob)
    try:
        weights.load(str(p))
    except WeightsError as e:
        assert str(p) in str(e)


def test_a_value_that_is_not_utf8_is_named(tmp_path, small_file):
    # the reader decodes strings only when a value is read: a token that is not UTF-8
    at = small_file.index(b"<|end_of_text|>")
    p = tmp_path / "f.gguf"
    p.write_bytes(small_file[:at] + b"\xab" + small_file[at + 1:])
    with pytest.raises(WeightsError, match=r"f\.gguf: metadata key 'tokenizer\.ggml\.tokens' cannot be read \(UnicodeDecodeError"):
        weights.load(str(p))


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # the file in a failure report: let the error show
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.integers(1, 1 << 20), st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_truncated_and_mutated_files(tmp_path, small_file, cut, edits):
    """Cut anywhere, or with bytes changed in the header and first tensors: a WeightsError
    naming the file, or a load."""
    blob = bytearray(small_file[: cut if cut < len(small_file) else len(small_file)])
    for at, value in edits:
        if blob:
            blob[at % len(blob)] = value
    _open_or_reject(tmp_path, bytes(blob))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_after_the_magic(tmp_path, blob):
    _open_or_reject(tmp_path, b"GGUF" + blob)


@pytest.mark.slow
def test_the_commands_take_a_gguf_file(tmp_path, tiny):
    """`zerostart generate` and `zerostart snapshot` on a GGUF file: the same text as the
    checkpoint it was written from (an F32 GGUF of bf16 weights holds the same values), and the
    ready image of it generates that text too."""
    import subprocess
    import sys

    from tests.serve._helpers import child_env

    with open(os.path.join(tiny, "config.json")) as f:
        cfg = json.load(f)
    path = write_gguf(str(tmp_path / "tiny.gguf"), cfg, {n: t.float() for n, t in weights.load(tiny).items()}, tiny)
    env = {**child_env(), "ZEROSTART_CACHE_DIR": str(tmp_path / "cache")}

    def generate(model: str) -> str:
        r = subprocess.run([sys.executable, "-m", "zerostart", "generate", "--model", model, "--prompt", "hello world",
                            "--max-tokens", "8"], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    text = generate(tiny)
    assert generate(path) == text and text
    r = subprocess.run([sys.executable, "-m", "zerostart", "snapshot", "--model", path, "--out", str(tmp_path / "img")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert weights.read_manifest(str(tmp_path / "img"))["source_identity"] == weights.identity(path)
    assert generate(str(tmp_path / "img")) == text
