"""The KV cache by blocks: the budget bounds blocks held, not slots; sequences take blocks as
they grow, give them back when they end, are preempted (and resume with the same tokens)
when blocks run out; a paged cache's memory is the blocks held."""

import pytest
import torch

from zerostart.engine import Engine, EngineConfig, EngineError, SamplingParams
from zerostart.engine._config import ModelShape
from zerostart.engine._kv_cache import bytes_per_token


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _prompt(n: int, k: int = 0) -> list[int]:
    return [(k * 37 + i * 11) % 480 + 5 for i in range(n)]


def _run(e: Engine, requests) -> list[list[int]]:
    handles = [e.submit(p, params) for p, params in requests]
    while any(not h.finished for h in handles):
        e.step()
    return [[ev.token_id for ev in h] for h in handles]


def _blocks_budget(tiny_dir, blocks: int, block_tokens: int = 64) -> int:
    """Bytes of ``blocks`` blocks of the tiny model in float32 (64 positions each on a CPU)."""
    cfg = ModelShape.from_file(f"{tiny_dir}/config.json")
    return blocks * block_tokens * bytes_per_token(cfg, torch.float32)


def _kv_rss(e: Engine) -> int:
    """Resident bytes of the KV cache's mapping (/proc/self/smaps)."""
    lo = e.kv_storage.data_ptr()
    hi = lo + e.kv_storage.numel() * e.kv_storage.element_size()
    total, span = 0, (0, 0)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                a, b = head.split("-")
                span = (int(a, 16), int(b, 16))
            elif head == "Rss:" and span[0] < hi and span[1] > lo:
                total += int(line.split()[1]) * 1024
    return total


def test_kv_budget_bounds_blocks_not_slots(tiny_dir):
    per_seq = _blocks_budget(tiny_dir, 2)  # 128 positions: one sequence of max_model_len
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_model_len=128, max_num_seqs=8,
                                                                             kv_cache_bytes=3 * per_seq + 100))
    kv = e.kv_stats()
    assert e.num_slots == kv.slots == 8  # slots are virtual: the budget bounds the blocks held
    assert kv.paged and kv.block_tokens == 64 and kv.blocks == 6 and kv.tokens == 384
    assert kv.nbytes == 3 * per_seq <= 3 * per_seq + 100 and kv.free_blocks == 6
    assert e.kv_storage.is_contiguous()
    with pytest.raises(EngineError, match="kv_cache_bytes"):
        Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_model_len=128, kv_cache_bytes=per_seq - 1))


def test_a_budget_of_five_full_contexts_runs_sixteen_short_requests_at_once(tiny_dir):
    # the default settings' shape: an 8,192-token context and a budget of 5 such sequences,
    # which reserved 5 slots (11 of 16 requests waited); by blocks all 16 run in one batch
    budget = _blocks_budget(tiny_dir, 5 * 128)
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_model_len=8192, kv_cache_bytes=budget))
    assert e.kv_stats().tokens == 5 * 8192
    requests = [(_prompt(30, k), _greedy(20)) for k in range(16)]
    refs = [_run(e, [r])[0] for r in requests[:3]]
    handles = [e.submit(p, params) for p, params in requests]
    e.step()
    assert len(e.scheduler.running) == 16 and not e.scheduler.waiting
    while any(not h.finished for h in handles):
        e.step()
    assert [[ev.token_id for ev in h] for h in handles][:3] == refs
    assert e.kv_stats().free_blocks == e.kv_stats().blocks and sorted(e.scheduler._free) == list(range(32))


def test_memory_held_is_the_blocks_held(tiny_dir):
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_model_len=1024, max_num_seqs=4))
    kv = e.kv_stats()
    block_bytes = kv.nbytes // kv.blocks
    base = _kv_rss(e)
    a = e.submit(_prompt(600), _greedy(4))
    b = e.submit(_prompt(200, 1), _greedy(4))
    while a._seq.in_prefill or b._seq.in_prefill:
        e.step()
    held = e.kv.held(a._seq.slot) + e.kv.held(b._seq.slot)
    assert held == 10 + 4 == kv.blocks - e.kv_stats().free_blocks  # blocks_for(prompt + 1) each
    scratch = 2 * 2 * 2 * 4096  # a page of each (layer, k/v, head) row: filler rows write the scratch position
    grown = _kv_rss(e) - base
    # a last block may be reserved and not yet written
    assert (held - 1) * block_bytes <= grown <= held * block_bytes + scratch
    while not (a.finished and b.finished):
        e.step()
    assert _kv_rss(e) - base <= scratch  # the blocks' pages went back to the kernel
    assert e.kv_stats().free_blocks == kv.blocks


def test_a_preempted_sequence_resumes_with_the_same_tokens(tiny_dir):
    # 5 blocks of 64 positions; two sequences growing to 200 positions need 8: the newer one is
    # preempted while decoding (slot and blocks given back), comes back when blocks are free,
    # prefills its prompt and output again, and goes on as if nothing happened
    cfg = EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_bytes=_blocks_budget(tiny_dir, 5))
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=cfg)
    seeded = SamplingParams(max_tokens=140, temperature=0.9, seed=7, ignore_eos=True)
    requests = [(_prompt(60, 0), _greedy(140)), (_prompt(60, 1), seeded)]
    solo = _run(e, requests[:1]) + _run(e, requests[1:])
    a, b = (e.submit(p, params) for p, params in requests)
    resumed = False
    while not (a.finished and b.finished):
        e.step()
        resumed |= b._seq.preempted > 0 and b._seq.in_prefill and b._seq.resumed
    assert b._seq.preempted >= 1 and resumed and a._seq.preempted == 0 and e.kv_stats().preemptions >= 1
    evs = [list(h) for h in (a, b)]
    assert [[ev.token_id for ev in h] for h in evs] == solo
    assert [ev.completion_tokens for ev in evs[1]] == list(range(1, 141))  # every token once, none again
    assert e.kv_stats().free_blocks == 5 and sorted(e.scheduler._free) == [0, 1, 2, 3]


def test_a_prompt_preempted_while_prefilling_scores_the_same(tiny_dir):
    # 7 blocks; two decoding sequences grow into the blocks a third one's prompt holds while it
    # is prefilled 4 tokens a step: it is preempted, and its prompt logprobs start over
    cfg = EngineConfig(max_model_len=256, max_num_seqs=4, prefill_chunk=4, kv_cache_bytes=_blocks_budget(tiny_dir, 7))
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=cfg)
    scored = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, prompt_logprobs=2)
    requests = [(_prompt(60, 0), _greedy(140)), (_prompt(60, 1), _greedy(140)), (_prompt(110, 2), scored)]
    solo = [list(e.generate(p, params)) for p, params in requests]
    a, b = (e.submit(p, params) for p, params in requests[:2])
    while a._seq.num_cached < 115:  # both decoding, 2 blocks each; 13 steps from needing a third
        e.step()
    c = e.submit(*requests[2])  # admitted with 2 blocks; prefilled 4 tokens a step
    handles = [a, b, c]
    while any(not h.finished for h in handles):
        e.step()
    assert c._seq.preempted >= 1 and a._seq.preempted == b._seq.preempted == 0
    got = [list(h) for h in handles]
    assert [[ev.token_id for ev in evs] for evs in got] == [[ev.token_id for ev in evs] for evs in solo]
    plp, ref = got[2][0].prompt_logprobs, solo[2][0].prompt_logprobs
    assert plp is not None and ref is not None and len(plp) == len(ref) == 110
    assert [x.token_id if x else None for x in plp] == [x.token_id if x else None for x in ref]
    assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(plp[1:], ref[1:]))
    assert e.kv_stats().free_blocks == 7 and sorted(e.scheduler._free) == [0, 1, 2, 3]


def test_a_prompt_waits_for_blocks_and_nobody_overtakes_it(tiny_dir):
    cfg = EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_bytes=_blocks_budget(tiny_dir, 5))
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=cfg)
    first = e.submit(_prompt(150), _greedy(3))  # 3 blocks
    e.step()
    big = e.submit(_prompt(200, 1), _greedy(3))  # 4 blocks: only 2 are free
    small = e.submit(_prompt(10, 2), _greedy(3))  # 1 block would fit, but arrived later
    e.step()
    assert big._seq.slot == -1 and small._seq.slot == -1 and list(e.scheduler.waiting) == [big._seq, small._seq]
    while not (first.finished and big.finished and small.finished):
        e.step()
    assert big._seq.scheduled_at is not None and small._seq.scheduled_at is not None
    assert big._seq.scheduled_at <= small._seq.scheduled_at
    assert e.kv_stats().free_blocks == 5


def test_scoring_needs_the_prompts_blocks(tiny_dir):
    cfg = EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_bytes=_blocks_budget(tiny_dir, 4))
    e = Engine.from_pretrained(tiny_dir, dtype="float32", config=cfg)
    ref = e.logits(_prompt(200))
    h = e.submit(_prompt(100, 1), _greedy(50))
    e.step()  # holds 2 of the 4 blocks
    with pytest.raises(EngineError, match="blocks"):
        e.logits(_prompt(200))
    while not h.finished:
        e.step()
    assert torch.equal(e.logits(_prompt(200)), ref)
    assert e.kv_stats().free_blocks == 4
