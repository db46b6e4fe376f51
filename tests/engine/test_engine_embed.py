"""Pooled embeddings from a decoder checkpoint against transformers' final hidden states:
last-token and mean pooling, normalized or not, truncated dimensions, chunked prefill, and
embedding requests batched with generation."""

import pytest
import torch

from zerostart.engine import Engine, EngineConfig, EngineError, PoolingParams, SamplingParams


@pytest.fixture(scope="module")
def hidden(tiny_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()

    def states(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).last_hidden_state[0]
    return states


@pytest.fixture(scope="module")
def chunked_engine(tiny_dir):
    engine = Engine.from_pretrained(tiny_dir, dtype="float32", config=EngineConfig(max_num_seqs=4, prefill_chunk=4))
    yield engine
    engine.stop()


def _embed(engine, ids, params):
    handle = engine.submit(ids, params)
    while not handle.finished:
        engine.step()
    (ev,) = list(handle)
    assert (ev.token_id, ev.finish_reason, ev.completion_tokens) == (None, "stop", 0)
    return torch.tensor(ev.embedding)


@pytest.mark.parametrize("engine_name", ["tiny_engine", "chunked_engine"])
def test_pooling_matches_transformers_hidden_states(request, engine_name, hidden):
    engine = request.getfixturevalue(engine_name)
    ids = engine.tokenizer.encode("a decoder can embed text: the last state or the mean of them all")
    ref = hidden(ids)
    last = ref[-1]
    mean = ref.mean(dim=0)
    torch.testing.assert_close(_embed(engine, ids, PoolingParams("last", normalize=False)), last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_embed(engine, ids, PoolingParams("mean", normalize=False)), mean, atol=1e-4, rtol=1e-4)
    got = _embed(engine, ids, PoolingParams("last"))
    torch.testing.assert_close(got, last / last.norm(), atol=1e-5, rtol=1e-4)
    assert abs(got.norm().item() - 1) < 1e-5
    short = _embed(engine, ids, PoolingParams("mean", dimensions=8))
    assert short.shape == (8,)
    torch.testing.assert_close(short, mean[:8] / mean[:8].norm(), atol=1e-5, rtol=1e-4)


def test_embeddings_batched_with_generation(chunked_engine, hidden):
    e = chunked_engine
    gen_ids = e.tokenizer.encode("Hello there")
    alone = [ev.token_id for ev in e.generate(gen_ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))]
    texts = ["first text to embed", "the second one is a little longer than the first", "third"]
    g = e.submit(gen_ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    hs = [e.submit(e.tokenizer.encode(t), PoolingParams("last")) for t in texts]
    while not (g.finished and all(h.finished for h in hs)):
        e.step()
    assert [ev.token_id for ev in g] == alone
    for t, h in zip(texts, hs):
        (ev,) = list(h)
        ref = hidden(e.tokenizer.encode(t))[-1]
        torch.testing.assert_close(torch.tensor(ev.embedding), ref / ref.norm(), atol=1e-5, rtol=1e-4)


def test_pooling_params_validation():
    with pytest.raises(EngineError, match="pooling"):
        PoolingParams("cls")
    with pytest.raises(EngineError, match="dimensions"):
        PoolingParams(dimensions=0)
