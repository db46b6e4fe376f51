"""Log-probabilities against transformers: generated tokens (greedy and sampled, with top
alternatives), prompt tokens (whole and chunked prefill, with and without generation), and
requests that ask for them batched with requests that do not."""

import pytest
import torch

from zerostart.engine import Engine, EngineConfig, SamplingParams

TOL = 1e-4  # float32 on both sides; the issue asks for 1e-3


@pytest.fixture(scope="module")
def chunked_engine(tiny_dir):
    engine = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=4, prefill_chunk=5))
    yield engine
    engine.stop()


def _ref(hf_tiny, ids):
    model, _ = hf_tiny
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _run(engine, ids, **kw):
    handle = engine.submit(ids, SamplingParams(**kw))
    while not handle.finished:
        engine.step()
    return list(handle)


def test_generated_logprobs_and_top_alternatives_match_transformers(tiny_engine, hf_tiny):
    ids = tiny_engine.tokenizer.encode("The cold start is short and the model is")
    evs = _run(tiny_engine, ids, max_tokens=12, temperature=0, ignore_eos=True, logprobs=5)
    out = [ev.token_id for ev in evs]
    ref = _ref(hf_tiny, ids + out)[len(ids) - 1 : -1]  # row i predicts out[i]
    for i, ev in enumerate(evs):
        lp = ev.logprob
        assert lp.token_id == out[i]
        assert abs(lp.logprob - ref[i, out[i]].item()) < TOL
        top = ref[i].topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()  # greedy: the chosen token is the best
        assert lp.top[0][0] == out[i]
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top.values, atol=TOL, rtol=0)


def test_sampled_logprobs_are_the_models_own_distribution(tiny_engine, hf_tiny):
    # temperature and top_k change what is drawn, not the log-probabilities reported
    ids = tiny_engine.tokenizer.encode("Hello world")
    evs = _run(tiny_engine, ids, max_tokens=10, temperature=1.7, top_k=20, seed=3, ignore_eos=True, logprobs=0)
    out = [ev.token_id for ev in evs]
    ref = _ref(hf_tiny, ids + out)[len(ids) - 1 : -1]
    got = torch.tensor([ev.logprob.logprob for ev in evs])
    torch.testing.assert_close(got, ref[torch.arange(len(out)), out], atol=TOL, rtol=0)
    assert all(ev.logprob.top == () for ev in evs)


@pytest.mark.parametrize("engine_name", ["tiny_engine", "chunked_engine"])
def test_prompt_logprobs_without_generation(request, engine_name, hf_tiny):
    engine = request.getfixturevalue(engine_name)
    ids = engine.tokenizer.encode("one two three four five six seven eight nine ten eleven twelve")
    assert len(ids) > 12  # several chunks of 5 in the chunked engine
    evs = _run(engine, ids, max_tokens=0, prompt_logprobs=2)
    assert len(evs) == 1
    ev = evs[0]
    assert (ev.token_id, ev.finish_reason, ev.completion_tokens, ev.text) == (None, "length", 0, "")
    plp = ev.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    ref = _ref(hf_tiny, ids)
    for pos in range(1, len(ids)):
        assert plp[pos].token_id == ids[pos]
        assert abs(plp[pos].logprob - ref[pos - 1, ids[pos]].item()) < TOL
        assert [t for t, _ in plp[pos].top] == ref[pos - 1].topk(2).indices.tolist()


def test_prompt_and_generated_logprobs_together_in_a_mixed_batch(chunked_engine, hf_tiny):
    e = chunked_engine
    a = e.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    b = e.tokenizer.encode("Hello there, general")
    plain = [ev.token_id for ev in _run(e, b, max_tokens=6, temperature=0, ignore_eos=True)]
    ha = e.submit(a, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1))
    hb = e.submit(b, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    hc = e.submit(a, SamplingParams(max_tokens=0, prompt_logprobs=0))
    while not (ha.finished and hb.finished and hc.finished):
        e.step()
    evs_a, evs_b, evs_c = list(ha), list(hb), list(hc)
    assert [ev.token_id for ev in evs_b] == plain and all(ev.logprob is None for ev in evs_b)
    assert evs_b[0].prompt_logprobs is None
    out = [ev.token_id for ev in evs_a]
    ref = _ref(hf_tiny, a + out)
    plp = evs_a[0].prompt_logprobs  # on the first event only
    assert all(ev.prompt_logprobs is None for ev in evs_a[1:])
    got = torch.tensor([p.logprob for p in plp[1:]])
    torch.testing.assert_close(got, ref[torch.arange(len(a) - 1), a[1:]], atol=TOL, rtol=0)
    gen = torch.tensor([ev.logprob.logprob for ev in evs_a])
    torch.testing.assert_close(gen, ref[torch.arange(len(a) - 1, len(a) + 3), out], atol=TOL, rtol=0)
    assert [p.logprob for p in evs_c[0].prompt_logprobs[1:]] == pytest.approx(got.tolist(), abs=TOL)
    assert all(p.top == () for p in evs_c[0].prompt_logprobs[1:])


def test_token_text_and_bytes_rebuild_the_text(tiny_engine):
    from zerostart.engine import TokenText

    text_of = TokenText(tiny_engine.tokenizer)
    s = "naïve café – 雪 🙂 done"
    ids = tiny_engine.tokenizer.encode(s, add_special_tokens=False)
    parts = [text_of(i) for i in ids]
    assert b"".join(b for _, b in parts) == s.encode()
    assert any(t.startswith("bytes:\\x") for t, _ in parts)  # a character split across tokens
    assert all(t == b.decode() for t, b in parts if not t.startswith("bytes:"))
