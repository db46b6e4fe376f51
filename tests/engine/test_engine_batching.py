"""Continuous batching, chunked prefill, and fused weights in one arena (the KV budget and its
blocks: test_engine_kv_blocks.py)."""

import pytest
import torch

from zerostart.engine import Engine, EngineConfig, EngineError, RequestHandle, SamplingParams
from zerostart.engine import _weights
from zerostart.engine._config import ModelShape

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _solo(engine, ids, params=GREEDY):
    return [ev.token_id for ev in engine.generate(ids, params)]


def test_long_prompt_prefills_in_chunks_while_decodes_flow(tiny_dir):
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=2, prefill_chunk=16))
    short = e.tokenizer.encode("Hello world")
    long = [(i * 7) % 500 + 5 for i in range(200)]
    ref_short = _solo(e, short, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    ref_long = _solo(e, long)
    a = e.submit(short, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    e.step()  # a: prefilled, first token
    e.step()  # a: decoding
    b = e.submit(long, GREEDY)
    seq_b = b._seq
    got_a = [ev.token_id for ev in [a.get(0), a.get(0)]]
    prefill_steps = 0
    while seq_b.in_prefill or seq_b.num_cached == 0:
        before = len(got_a)
        cached = seq_b.num_cached
        e.step()
        ev = a.get(0)
        got_a.append(ev.token_id)
        assert len(got_a) == before + 1  # a got a token in every step of b's prefill
        assert seq_b.num_cached - cached <= 16
        prefill_steps += 1
    assert prefill_steps == -(-len(long) // 16)
    while not (a.finished and b.finished):
        e.step()
    got_a += [ev.token_id for ev in a]
    assert got_a == ref_short
    assert [ev.token_id for ev in b] == ref_long


def test_sequences_join_and_leave_between_steps(tiny_dir):
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=3, prefill_chunk=64))
    prompts = [e.tokenizer.encode(t) for t in ("one", "two three", "four five six", "seven", "eight nine")]
    lengths = [3, 9, 5, 7, 4]
    refs = [_solo(e, p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    handles: list[RequestHandle] = []
    step = 0
    pending = list(zip(prompts, lengths))
    while pending or any(not h.finished for h in handles):
        if pending and step % 2 == 0:  # a new request every other step
            p, n = pending.pop(0)
            handles.append(e.submit(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
        e.step()
        assert len(e.scheduler.running) <= 3
        step += 1
    assert [[ev.token_id for ev in h] for h in handles] == refs
    assert sorted(e.scheduler._free) == [0, 1, 2]


def _arena(cfg, order, dtype=torch.float32):
    """Tensors as views into one storage, laid out in ``order``: what a loader produces."""
    shapes = _weights.expected_shapes(cfg)
    total = sum(torch.Size(shapes[n]).numel() for n in order)
    storage = torch.empty(total, dtype=dtype)
    tensors, off = {}, 0
    g = torch.Generator().manual_seed(0)
    for n in order:
        numel = torch.Size(shapes[n]).numel()
        t = storage[off : off + numel].view(shapes[n])
        t.copy_(torch.randn(shapes[n], generator=g))
        tensors[n] = t
        off += numel
    return storage, tensors


def _cfg():
    return ModelShape.from_dict(dict(architectures=["Qwen2ForCausalLM"], vocab_size=64, hidden_size=32,
                                      intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2))


def test_fusion_views_adjacent_weights_without_copies():
    cfg = _cfg()
    names = list(_weights.expected_shapes(cfg))
    weights = [n for n in names if "bias" not in n]  # q, k, v and gate, up back to back
    biases = [n for n in names if "bias" in n]
    _, tensors = _arena(cfg, weights + biases)
    plan = _weights.plan_fusion(cfg, tensors, "auto", writable=False)
    assert plan.qkv == [True, True] and plan.gate_up == [True, True] and plan.regrouped_bytes == 0
    # biases in reverse order: q/k/v cannot be one matmul with one bias; gate/up still can
    storage, tensors = _arena(cfg, weights + biases[::-1])
    before = {n: t.clone() for n, t in tensors.items()}
    plan = _weights.plan_fusion(cfg, tensors, "auto", writable=False)
    assert plan.qkv == [False, False] and plan.gate_up == [True, True] and plan.regrouped_bytes == 0
    sd = _weights.state_dict(cfg, tensors, plan)
    assert "layers.0.attn.qkv.weight0" in sd and "layers.0.attn.qkv.bias2" in sd
    gu = sd["layers.0.mlp.gate_up.weight"]
    assert gu.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    torch.testing.assert_close(gu, torch.cat([before["model.layers.0.mlp.gate_proj.weight"],
                                              before["model.layers.0.mlp.up_proj.weight"]]), rtol=0, atol=0)


def test_fusion_regroups_in_place_when_allowed():
    cfg = _cfg()
    sorted_order = sorted(_weights.expected_shapes(cfg))  # the order Hugging Face files use: k, o, q, v
    storage, tensors = _arena(cfg, sorted_order)
    before = {n: t.clone() for n, t in tensors.items()}
    untouched = _weights.plan_fusion(cfg, dict(tensors), "auto", writable=False)
    assert untouched.qkv == [False, False] and untouched.regrouped_bytes == 0
    plan = _weights.plan_fusion(cfg, tensors, "auto", writable=True)
    assert plan.qkv == [True, True] and plan.gate_up == [True, True] and plan.regrouped_bytes > 0
    for n, t in tensors.items():  # same values, still views of the one storage
        assert t.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
        torch.testing.assert_close(t, before[n], rtol=0, atol=0)
    sd = _weights.state_dict(cfg, tensors, plan)
    q, k, v = (before[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    torch.testing.assert_close(sd["layers.1.attn.qkv.weight"], torch.cat([q, k, v]), rtol=0, atol=0)
    qb, kb, vb = (before[f"model.layers.1.self_attn.{x}_proj.bias"] for x in "qkv")
    torch.testing.assert_close(sd["layers.1.attn.qkv.bias"], torch.cat([qb, kb, vb]), rtol=0, atol=0)


def test_fused_and_unfused_models_agree(tiny_dir):
    ids = [5, 9, 200, 17, 33, 2, 480]
    never = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(fuse="never", max_num_seqs=1))
    always = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(fuse="auto", max_num_seqs=1))
    assert never.fusion.qkv == [False, False] and always.fusion.qkv == [True, True]  # the demo's layout fuses free
    assert always.fusion.gate_up == [True, True] and always.fusion.regrouped_bytes == 0
    sd = always.model.state_dict()
    assert sd["layers.0.attn.qkv.weight"].untyped_storage().data_ptr() == always.weights_storage.untyped_storage().data_ptr()
    torch.testing.assert_close(never.logits(ids), always.logits(ids), atol=1e-5, rtol=0)
    assert _solo(never, ids) == _solo(always, ids)


def test_lone_sequence_in_a_high_slot(tiny_dir):
    # when the others finish, the last sequence decodes from slot 7 alone: its keys are gathered
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=8))
    long = e.tokenizer.encode("the last one")
    ref = _solo(e, long, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    shorts = [e.submit([5 + i, 9], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)) for i in range(7)]
    h = e.submit(long, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    e.step()
    assert h._seq.slot == 7
    while not h.finished:
        e.step()
    assert all(s.finished for s in shorts)
    assert [ev.token_id for ev in h] == ref


def test_failed_step_ends_the_streams_of_its_batch_with_the_error(tiny_dir, monkeypatch):
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=2))
    handles = [e.submit([1, 2, 3], GREEDY) for _ in range(3)]  # two take the slots, one waits

    def broken(*a, **k):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(e.runner, "step", broken)
    with pytest.raises(RuntimeError, match="fell over"):
        e.step()
    for h in handles[:2]:
        with pytest.raises(EngineError, match="fell over"):
            list(h)
    monkeypatch.undo()
    while not handles[2].finished:  # the one that was waiting is served
        e.step()
    assert len([ev.token_id for ev in handles[2]]) == 12
    assert len(_solo(e, [1, 2, 3])) == 12  # the engine still works
    assert e.stats()["running"] == e.stats()["waiting"] == 0


def test_bucketed_decode_matches_exact_shapes(tiny_dir):
    # the path CUDA graphs and torch.compile take (padded batch and context buckets, static
    # input buffers), run eagerly on CPU: the same tokens as exact-shape steps
    plain = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=5, max_model_len=300))
    bucketed = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=5, max_model_len=300))
    bucketed.runner.bucketed = True
    assert bucketed.runner.batch_buckets == [1, 2, 4, 5] and bucketed.runner.len_buckets == [256, 300]
    prompts = [[5 + i] * (3 + 55 * i) for i in range(5)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)  # the last crosses 256

    def run(e):
        hs = [e.submit(p, params) for p in prompts]
        while any(not h.finished for h in hs):
            e.step()
        return [[ev.token_id for ev in h] for h in hs]

    assert run(bucketed) == run(plain)
    assert {(5, 256), (5, 300)} <= set(bucketed.runner._graphs)
