"""Parity with Hugging Face transformers on small random configs of every supported family.

Each variant is built by transformers with random weights (perturbed so norms and biases are
not their trivial init), saved as a Hugging Face checkpoint, and loaded by the engine. Then:
fp32 logits of a prompt within 1e-4 (whole and chunked prefill, and every decode step), the
same 32-token greedy continuation, and the same continuations when several prompts share
batched steps.
"""

import os
import shutil
import zlib
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from zerostart.engine import Engine, EngineConfig, SamplingParams  # noqa: E402

from tests.engine._steps import step_logits  # noqa: E402

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama-tied-bias": ("LlamaConfig", "LlamaForCausalLM",
                        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM",
                            dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                    "original_max_position_embeddings": 32})),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7, head_dim=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2-sliding-yarn": ("Qwen2Config", "Qwen2ForCausalLM",
                           dict(use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 64})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "qwen3-sliding-linear": ("Qwen3Config", "Qwen3ForCausalLM",
                             dict(head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=2,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0})),
}

PROMPT = ("Hello world, the model is fast and the cold start is short: one two three four five six "
          "seven eight nine ten")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory, tiny_dir):
    """(engine, transformers model, tokenizer ids of PROMPT) for one variant."""
    config_cls, model_cls, extra = VARIANTS[request.param]
    cfg = getattr(transformers, config_cls)(**{**BASE, **extra})
    torch.manual_seed(zlib.crc32(request.param.encode()))  # the same weights in every run (hash() is salted per process)
    model = getattr(transformers, model_cls)(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_dir, name), path / name)
    engine = Engine.from_pretrained(str(path), config=EngineConfig(max_num_seqs=4, prefill_chunk=16))
    ids = engine.tokenizer.encode(PROMPT)
    assert len(ids) > 2 * max(w or 0 for w in engine.model_config.sliding_windows)
    yield request.param, engine, model, ids
    engine.stop()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_config_read_as_transformers_reads_it(pair):
    name, engine, model, _ = pair
    c, hf = engine.model_config, model.config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, head_dim)
    hf_windows = [hf.sliding_window if t == "sliding_attention" or (name.startswith("mistral") and hf.sliding_window)
                  else None for t in getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers]
    assert list(c.sliding_windows) == hf_windows
    if "sliding" in name:
        assert any(c.sliding_windows)


def test_prefill_logits(pair):
    _, engine, model, ids = pair
    ref = _hf_logits(model, ids)
    whole = engine.logits(ids, chunk=len(ids))
    chunked = engine.logits(ids, chunk=5)  # offsets and windows that straddle chunks
    assert whole.shape == ref.shape
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked, ref, atol=1e-4, rtol=0)


def test_greedy_32_tokens_and_decode_logits(pair, monkeypatch):
    _, engine, model, ids = pair
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    assert len(expected) == 32

    seen = []
    sampler = engine.sampler

    def spy(logits, seqs):
        seen.append(logits.clone())
        return sampler(logits, seqs)

    monkeypatch.setattr(engine, "sampler", spy)
    got = [ev.token_id for ev in engine.generate(ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))]
    assert got == expected
    # each step's logits (the prefill's last row, then every decode step) equal the reference
    ref = _hf_logits(model, ids + expected)[len(ids) - 1 : -1]
    torch.testing.assert_close(torch.cat(seen), ref, atol=1e-4, rtol=0)


BATCHED = {"llama", "mistral-sliding", "qwen2-sliding-yarn", "qwen3-sliding-linear"}


@pytest.mark.parametrize("pair", sorted(BATCHED), indirect=True)
def test_batched_continuations_match(pair):
    # one variant of each family, sliding windows included
    name, engine, model, ids = pair
    prompts = [ids, ids[:9], ids[3:30], ids[:2], ids[5:]]  # more prompts than slots (4)
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    handles = [engine.submit(p, params) for p in prompts]
    while any(not h.finished for h in handles):
        engine.step()
    assert [[ev.token_id for ev in h] for h in handles] == expected


def test_the_decode_stack_gives_the_layers_bits(pair):
    """Decode-only steps run every layer in one library call where the CPU kernels are built
    (the decode stack): each family's logits equal, bit for bit, its Python layers' on the same
    ops (biases, q/k norms, sliding windows, tied embeddings)."""
    _, engine, _, ids = pair
    if not engine.model.stack:
        pytest.skip("the CPU kernels are not built")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    jobs = [(ids, params), (ids[:9], params), (ids[3:30], params)]
    stacked = step_logits(engine, jobs)
    engine.model.use_kernels(True, stack=False)
    try:
        layers = step_logits(engine, jobs)
    finally:
        engine.model.use_kernels(True)
    assert len(stacked) == len(layers) and all(torch.equal(a, b) for a, b in zip(stacked, layers))
