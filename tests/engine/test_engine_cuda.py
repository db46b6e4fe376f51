"""CUDA: parity in float32, CUDA graphs and torch.compile against eager, batching, in-place fusion.

Run on a machine with a GPU: ``python -m pytest tests/engine -m gpu``.
"""

import pytest
import torch

from zerostart.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
PROMPTS = ["Hello world", "The model is fast", "one two three four five six seven eight nine", "a",
           "cold start", "b c d e f g"]


def _tokens(engine, prompts, params=GREEDY):
    handles = [engine.submit(engine.tokenizer.encode(p), params) for p in prompts]
    while any(not h.finished for h in handles):
        engine.step()
    return [[ev.token_id for ev in h] for h in handles]


@pytest.fixture(scope="module")
def cpu_ref(tiny_dir):
    e = Engine.from_pretrained(tiny_dir, device="cpu", config=EngineConfig(max_num_seqs=1))
    return e, [_tokens(e, [p])[0] for p in PROMPTS]


def test_float32_on_cuda_matches_transformers(tiny_dir, hf_tiny):
    model, tok = hf_tiny
    model = model.to("cuda")
    e = Engine.from_pretrained(tiny_dir, device="cuda", dtype="float32", config=EngineConfig(max_num_seqs=2))
    assert e.device.type == "cuda" and e.kv_storage.is_cuda
    ids = tok(PROMPTS[2]).input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids], device="cuda")).logits[0].float()
        out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"))
    torch.testing.assert_close(e.logits(ids), ref, atol=2e-4, rtol=0)
    assert _tokens(e, [PROMPTS[2]])[0] == out[0, len(ids):].tolist()
    model.to("cpu")


@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_batching_matches_solo_runs(tiny_dir, cpu_ref, graphs):
    _, solo = cpu_ref
    e = Engine.from_pretrained(tiny_dir, device="cuda", dtype="float32",
                               config=EngineConfig(max_num_seqs=4, cuda_graphs=graphs, prefill_chunk=8))
    assert bool(e.runner._graphs) == graphs  # warm-up captured the decode graphs
    assert _tokens(e, PROMPTS) == solo  # 6 prompts through 4 slots, chunked prefill


def test_cuda_graph_buckets_replay(tiny_dir, cpu_ref):
    _, solo = cpu_ref
    e = Engine.from_pretrained(tiny_dir, device="cuda", dtype="float32", config=EngineConfig(max_num_seqs=8))
    before = set(e.runner._graphs)
    assert {nb for nb, _ in before} == set(e.runner.batch_buckets)
    long_params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)  # crosses the 256 bucket
    e.submit(e.tokenizer.encode("x"), long_params)
    assert _tokens(e, PROMPTS[:3]) == solo[:3]
    while e.scheduler.has_work:
        e.step()
    assert set(e.runner._graphs) > before  # a longer context captured its bucket on first use


def test_cuda_bfloat16_default(tiny_dir):
    e = Engine.from_pretrained(tiny_dir, device="cuda")
    assert e.dtype == torch.bfloat16
    evs = list(e.generate("Hello", SamplingParams(max_tokens=8, temperature=0.8, seed=3)))
    again = list(e.generate("Hello", SamplingParams(max_tokens=8, temperature=0.8, seed=3)))
    assert [ev.token_id for ev in evs] == [ev.token_id for ev in again]


@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores")  # inductor's advice on newer torch
def test_cuda_compile_matches_eager(tiny_dir, cpu_ref):
    _, solo = cpu_ref
    e = Engine.from_pretrained(tiny_dir, device="cuda", dtype="float32",
                               config=EngineConfig(max_num_seqs=2, compile=True, max_model_len=128))
    assert _tokens(e, PROMPTS[:2]) == solo[:2]


def test_cuda_in_place_fusion(tiny_dir, hf_tiny, tmp_path, cpu_ref):
    import shutil

    _, solo = cpu_ref
    # transformers writes tensors sorted by name (k, o, q, v): fusing needs a regroup in device memory
    hf_tiny[0].save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{tiny_dir}/{name}", tmp_path / name)
    e = Engine.from_pretrained(str(tmp_path), device="cuda", dtype="float32")
    assert all(e.fusion.qkv) and all(e.fusion.gate_up) and e.fusion.regrouped_bytes > 0
    ptr = e.weights_storage.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == ptr for p in e.model.parameters())
    assert _tokens(e, PROMPTS[:2]) == solo[:2]


def test_cuda_kv_cache_is_backed_in_full_and_counted_in_blocks(tiny_dir, cpu_ref):
    # device memory is not committed block by block: the budget bounds slots (3 full contexts
    # here, 144 positions of 512 bytes each), and blocks of 16 positions are counted within them
    _, solo = cpu_ref
    e = Engine.from_pretrained(tiny_dir, device="cuda", dtype="float32",
                               config=EngineConfig(max_model_len=128, max_num_seqs=8, kv_cache_bytes=3 * 144 * 512 + 100))
    kv = e.kv_stats()
    assert not kv.paged and kv.slots == e.num_slots == 3 and kv.block_tokens == 16 and kv.blocks == 3 * 144 // 16
    assert bool(torch.isfinite(e.kv_storage).all())  # zeroed once: masked positions are finite
    assert _tokens(e, PROMPTS) == solo  # 6 prompts through 3 slots, decode graphs with filler rows
    assert e.kv_stats().free_blocks == kv.blocks and e.kv_stats().preemptions == 0
