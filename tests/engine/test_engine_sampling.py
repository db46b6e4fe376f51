"""Sampling: the filters' distributions, seeds, penalties, stop tokens and stop strings."""

import math
from collections import Counter
from typing import Any

import pytest
import torch

from zerostart.engine import SamplingParams
from zerostart.engine._sampler import Sampler


class _FakeSeq:
    """What the sampler reads from a sequence."""

    def __init__(self, params, counts=None, output_ids=(), prompt_seen=None, stop_ids=frozenset(), matcher=None):
        self.params = params
        self.counts = counts
        self.output_ids = list(output_ids)
        self.prompt_seen = prompt_seen
        self.stop_ids = stop_ids
        self.matcher = matcher
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def holds_stop(self):
        return len(self.output_ids) < self.params.min_tokens


_Seq: Any = _FakeSeq  # stands in for the sampler's Sequence (duck-typed: the attributes it reads)

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def _draw(params, n=4000, logits=LOGITS, seed=0):
    sampler = Sampler(len(logits), torch.device("cpu"), seed)
    seqs = [_Seq(params) for _ in range(n)]
    return Counter(sampler(logits.repeat(n, 1), seqs))


def _close(counts, probs, n, tol=4.5):
    # every frequency within tol standard deviations of its expectation
    for i, p in enumerate(probs):
        sd = math.sqrt(n * p * (1 - p)) or 1.0
        assert abs(counts.get(i, 0) - n * p) <= tol * sd, (i, counts, probs)


def test_temperature_one_follows_softmax():
    _close(_draw(SamplingParams(temperature=1.0)), [0.5, 0.3, 0.15, 0.05], 4000)


def test_temperature_sharpens_and_flattens():
    n = 4000
    for t in (0.5, 2.0):
        p = torch.softmax(LOGITS / t, 0).tolist()
        _close(_draw(SamplingParams(temperature=t), n), p, n)


def test_greedy_is_argmax():
    assert _draw(SamplingParams(temperature=0), 50) == Counter({0: 50})


def test_top_k_keeps_the_k_likeliest():
    n = 4000
    counts = _draw(SamplingParams(top_k=2), n)
    assert set(counts) == {0, 1}
    _close(counts, [0.5 / 0.8, 0.3 / 0.8, 0, 0], n)
    assert _draw(SamplingParams(top_k=1), 100) == Counter({0: 100})


def test_top_p_keeps_the_smallest_set_reaching_p():
    n = 4000
    counts = _draw(SamplingParams(top_p=0.7), n)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: tokens 0 and 1
    assert set(counts) == {0, 1}
    _close(counts, [0.5 / 0.8, 0.3 / 0.8, 0, 0], n)
    assert _draw(SamplingParams(top_p=0.4), 100) == Counter({0: 100})  # the top token always stays


def test_mixed_rows_in_one_batch():
    sampler = Sampler(4, torch.device("cpu"), 0)
    seqs = [_Seq(SamplingParams(temperature=0)), _Seq(SamplingParams(top_k=1)), _Seq(SamplingParams(top_p=0.3)),
            _Seq(SamplingParams(temperature=1.0, top_k=3, top_p=0.9))]
    flipped = torch.log(torch.tensor([0.05, 0.15, 0.3, 0.5]))
    logits = torch.stack([LOGITS, flipped, LOGITS, flipped])
    for _ in range(50):
        out = sampler(logits, seqs)
        assert out[:3] == [0, 3, 0] and out[3] in (1, 2, 3)


def test_seed_reproducible_and_independent_of_the_batch():
    params = SamplingParams(temperature=1.0, seed=42)
    logits = torch.randn(1, 300)
    a = [Sampler(300, torch.device("cpu"), None)(logits, [_Seq(params)])[0] for _ in range(1)]
    s1, s2 = _Seq(params), _Seq(params)
    sampler = Sampler(300, torch.device("cpu"), None)
    alone = [sampler(logits, [s1])[0] for _ in range(20)]
    crowd = []
    for _ in range(20):  # the seeded row shares every step with unseeded rows
        others = [_Seq(SamplingParams(temperature=1.0)) for _ in range(3)]
        crowd.append(sampler(logits.repeat(4, 1), [others[0], s2, others[1], others[2]])[1])
    assert alone == crowd and alone[0] == a[0]
    s3 = _Seq(SamplingParams(temperature=1.0, seed=43))
    assert [sampler(logits, [s3])[0] for _ in range(20)] != alone


def test_penalties_follow_openai_definitions():
    sampler = Sampler(4, torch.device("cpu"), 0)
    logits = torch.tensor([[2.0, 1.9, 1.0, 0.0]])
    counts = torch.tensor([3.0, 0.0, 0.0, 0.0])
    # presence: -0.5 once for token 0 -> 1.5 < 1.9
    assert sampler(logits, [_Seq(SamplingParams(temperature=0, presence_penalty=0.5), counts)]) == [1]
    # frequency: -0.05 * 3 = -0.15 -> 1.85 < 1.9
    assert sampler(logits, [_Seq(SamplingParams(temperature=0, frequency_penalty=0.05), counts)]) == [1]
    # small enough not to change the winner
    assert sampler(logits, [_Seq(SamplingParams(temperature=0, frequency_penalty=0.01), counts)]) == [0]
    # negative penalties favour repeats
    logits2 = torch.tensor([[1.0, 1.5, 0.0, 0.0]])
    assert sampler(logits2, [_Seq(SamplingParams(temperature=0, presence_penalty=-1.0), counts)]) == [0]


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    V = 64
    logits = torch.randn(1, V) * 3
    prompt, output = [3, 5, 5, 9], [11, 3, 40]
    seen = torch.zeros(V, dtype=torch.bool)
    seen[prompt] = True
    counts = torch.zeros(V)
    for t in output:
        counts[t] += 1
    for penalty in (1.3, 0.7):
        ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone())
        got = logits.clone()
        Sampler(V, torch.device("cpu"), 0)._penalize(got, [_Seq(SamplingParams(repetition_penalty=penalty), counts,
                                                               prompt_seen=seen)])
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_min_p_keeps_tokens_above_a_fraction_of_the_best():
    # probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.35 keeps 0.5 and 0.3 (>= 0.175), renormalized
    n = 4000
    _close(_draw(SamplingParams(temperature=1.0, min_p=0.35), n), [0.625, 0.375, 0.0, 0.0], n)
    counts = _draw(SamplingParams(temperature=1.0, min_p=0.9), 200)
    assert counts == Counter({0: 200})


def test_min_tokens_holds_stop_tokens_back():
    sampler = Sampler(4, torch.device("cpu"), 0)
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0]])  # token 1 (the stop token) is the favourite
    params = SamplingParams(temperature=0, min_tokens=2, max_tokens=5)
    assert sampler(logits, [_Seq(params, output_ids=[7], stop_ids=frozenset({1}))]) == [2]
    assert sampler(logits, [_Seq(params, output_ids=[7, 8], stop_ids=frozenset({1}))]) == [1]


# -- through the engine ------------------------------------------------------------------------

def _run(engine, prompt, **kw):
    return list(engine.generate(prompt, SamplingParams(**kw)))


def test_engine_seeded_sampling(tiny_engine):
    a = [ev.token_id for ev in _run(tiny_engine, "Hello", max_tokens=20, temperature=1.0, seed=7)]
    b = [ev.token_id for ev in _run(tiny_engine, "Hello", max_tokens=20, temperature=1.0, seed=7)]
    c = [ev.token_id for ev in _run(tiny_engine, "Hello", max_tokens=20, temperature=1.0, seed=8)]
    assert a == b and a != c


def test_engine_frequency_penalty_reduces_repeats(tiny_engine):
    plain = [ev.token_id for ev in _run(tiny_engine, "Hello", max_tokens=40, temperature=0, ignore_eos=True)]
    pen = [ev.token_id for ev in _run(tiny_engine, "Hello", max_tokens=40, temperature=0, ignore_eos=True,
                                      frequency_penalty=2.0, presence_penalty=2.0)]
    assert max(Counter(plain).values()) > 3  # the random model repeats itself when greedy
    assert max(Counter(pen).values()) < max(Counter(plain).values())


def test_engine_stop_token_ids(tiny_engine):
    ref = _run(tiny_engine, "Hello", max_tokens=30, temperature=0, ignore_eos=True)
    ids = [ev.token_id for ev in ref]
    k = next(i for i in range(5, 30) if ids[i] not in ids[:i])  # first occurrence of some token
    evs = _run(tiny_engine, "Hello", max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[ids[k]])
    assert [ev.token_id for ev in evs] == ids[: k + 1]
    assert evs[-1].finish_reason == "stop" and evs[-1].completion_tokens == k + 1
    text = "".join(ev.text for ev in evs)
    assert text == tiny_engine.tokenizer.decode(ids[:k], skip_special_tokens=True)


def test_engine_stop_strings(tiny_engine):
    ref = "".join(ev.text for ev in _run(tiny_engine, "The model", max_tokens=40, temperature=0, ignore_eos=True))
    stop = ref[len(ref) // 2 : len(ref) // 2 + 3]
    cut = ref[: ref.index(stop)]
    evs = _run(tiny_engine, "The model", max_tokens=40, temperature=0, ignore_eos=True, stop=["zzzz-never", stop])
    assert "".join(ev.text for ev in evs) == cut
    assert evs[-1].finish_reason == "stop"


def test_engine_eos_ids_from_generation_config(tiny_engine):
    tok = tiny_engine.tokenizer
    assert tiny_engine.eos_token_ids == {tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")}


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.5), (3, 0.8)])
def test_engine_filters_stay_in_the_allowed_set(tiny_engine, top_k, top_p):
    ids = tiny_engine.tokenizer.encode("Hello world")
    logits = tiny_engine.logits(ids)[-1]
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True).tolist()
    allowed = set(order[:top_k]) if top_k else set(order)
    if top_p < 1:
        mass, keep = 0.0, set()
        for t in order:
            if mass >= top_p:
                break
            keep.add(t)
            mass += probs[t].item()
        allowed &= keep
    for seed in range(30):
        ev = next(iter(tiny_engine.generate(ids, SamplingParams(max_tokens=1, top_k=top_k, top_p=top_p, seed=seed))))
        assert ev.token_id in allowed


def test_engine_min_tokens_ignores_stop_tokens_and_strings_until_reached(tiny_engine):
    ref = _run(tiny_engine, "Hello", max_tokens=30, temperature=0, ignore_eos=True)
    ids = [ev.token_id for ev in ref]
    first = ids[0]
    # stopping on the first token ends at once; min_tokens 6 keeps it from ending before token 6
    assert [ev.token_id for ev in _run(tiny_engine, "Hello", max_tokens=30, temperature=0, ignore_eos=True,
                                       stop_token_ids=[first])] == [first]
    held = _run(tiny_engine, "Hello", max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[first],
                min_tokens=6)
    got = [ev.token_id for ev in held]
    assert len(got) >= 6 and first not in got[:6]
    assert got[-1] == first or len(got) == 30
    text = "".join(ev.text for ev in ref)
    stop = text[:2]  # the stream's own first characters as a stop string
    evs = _run(tiny_engine, "Hello", max_tokens=12, temperature=0, ignore_eos=True, stop=[stop], min_tokens=4)
    assert len(evs) >= 4
    assert "".join(ev.text for ev in evs).startswith(stop)


def test_engine_repetition_penalty_changes_greedy_output(tiny_engine):
    plain = [ev.token_id for ev in _run(tiny_engine, "Hello", max_tokens=40, temperature=0, ignore_eos=True)]
    pen = [ev.token_id for ev in _run(tiny_engine, "Hello", max_tokens=40, temperature=0, ignore_eos=True,
                                      repetition_penalty=2.0)]
    assert max(Counter(pen).values()) < max(Counter(plain).values())
