"""Chunked prefill that is fair: a short prompt's first token never waits for a long prompt's
whole prefill, and a stream of short prompts never starves a long one (counted in steps)."""

from zerostart.engine import Engine, EngineConfig, SamplingParams
from zerostart.engine._scheduler import Scheduler
from zerostart.engine._sequence import Sequence


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _prompt(n: int, k: int = 0) -> list[int]:
    return [(k * 37 + i * 11) % 480 + 5 for i in range(n)]


def _solo(e: Engine, ids: list[int], n: int) -> list[int]:
    return [ev.token_id for ev in e.generate(ids, _greedy(n))]


def test_a_short_prompt_behind_an_8000_token_prompt_starts_within_one_chunk(tiny_dir):
    e = Engine.from_pretrained(tiny_dir, dtype="float32",
                               config=EngineConfig(max_model_len=8192, max_num_seqs=4, prefill_chunk=512))
    long_ids, short_ids = _prompt(8000), _prompt(20, 1)
    ref_long, ref_short = _solo(e, long_ids, 2), _solo(e, short_ids, 6)
    long = e.submit(long_ids, _greedy(2))
    e.step()
    e.step()  # two chunks of the long prompt are in
    short = e.submit(short_ids, _greedy(6))
    before = long._seq.num_cached
    e.step()  # one step: one chunk's time
    first = short.get(timeout=0)
    assert first is not None and first.token_id == ref_short[0]
    assert long._seq.in_prefill and long._seq.num_cached - before == 512 - 20  # the chunk less the short prompt
    steps = 0
    while not short.finished:  # and it decodes a token in every step of the long prefill
        e.step()
        steps += 1
    assert steps == 5 and long._seq.in_prefill
    assert [first.token_id] + [ev.token_id for ev in short] == ref_short
    while not long.finished:
        e.step()
    assert [ev.token_id for ev in long] == ref_long


def _seq(n: int) -> Sequence:
    from zerostart.engine._detok import Detokenizer

    class _NoTokenizer:
        def decode(self, ids, skip_special_tokens=False):  # pragma: no cover - never called
            return ""

    return Sequence(_prompt(n), _greedy(1), Detokenizer(_NoTokenizer(), ()), 1, frozenset())  # type: ignore[arg-type]


def test_a_stream_of_short_prompts_does_not_starve_a_long_one() -> None:
    s = Scheduler(num_slots=64, prefill_chunk=512)
    long = _seq(8000)
    s.add(long)
    steps = 0
    while long.in_prefill:
        s.add(_seq(400))  # a new 400-token prompt every step: more than the budget leaves over
        _, prefills = s.schedule()
        plan = dict((id(q), n) for q, n in prefills)
        assert plan[id(long)] >= 256 or long.prefill_len - long.num_cached < 256  # half the budget at least
        assert sum(plan.values()) <= 512
        for q, n in prefills:
            q.num_cached += n
        for q in [q for q in s.running if q is not long and not q.in_prefill]:
            s.remove(q)  # the short ones end once prefilled (max_tokens 1)
        steps += 1
    assert steps <= 2 * -(-8000 // 512)


def test_shortest_rest_first_then_admission_order() -> None:
    s = Scheduler(num_slots=8, prefill_chunk=100)
    a, b, c = _seq(300), _seq(30), _seq(30)
    for q in (a, b, c):
        s.add(q)
    _, prefills = s.schedule()
    assert prefills == [(a, 50), (b, 30), (c, 20)]  # a: half the budget; b, then c, in the rest
