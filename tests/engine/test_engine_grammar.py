"""Grammar-constrained decoding through the engine (llguidance): whatever a random-weights
model prefers, the output matches the schema, object, regex or Lark grammar, ends when the
grammar is complete, and batches with unconstrained requests without changing them."""

import json
import re

import pytest
import torch

from zerostart.engine import Constraint, EngineError, SamplingParams
from zerostart.engine._grammar import apply_bitmask

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 999},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "ok", "size", "color", "tags"],
    "additionalProperties": False,
}


def _run(engine, prompt, **kw):
    evs = list(engine.generate(prompt, SamplingParams(**kw)))
    return "".join(ev.text for ev in evs), evs


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 5), (1.3, 9)])
def test_json_schema_output_validates(tiny_engine, temperature, seed):
    text, evs = _run(tiny_engine, "Give me JSON:", max_tokens=300, temperature=temperature, seed=seed,
                     constraint=Constraint("json_schema", SCHEMA))
    assert evs[-1].finish_reason == "stop", text  # the grammar completed, not max_tokens
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_output_is_an_object(tiny_engine):
    text, evs = _run(tiny_engine, "Hello", max_tokens=400, temperature=0.8, seed=1,
                     constraint=Constraint("json_object"))
    assert evs[-1].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_regex_and_lark(tiny_engine):
    text, evs = _run(tiny_engine, "Hello", max_tokens=40, temperature=1.0, seed=2,
                     constraint=Constraint("regex", r"(yes|no), [0-9]{2,4}"))
    assert re.fullmatch(r"(yes|no), [0-9]{2,4}", text) and evs[-1].finish_reason == "stop"
    lark = 'start: "<answer>" WORD "</answer>"\nWORD: /[a-z]{1,8}/\n'
    text, evs = _run(tiny_engine, "Hello", max_tokens=40, temperature=1.0, seed=3, constraint=Constraint("lark", lark))
    assert re.fullmatch(r"<answer>[a-z]{1,8}</answer>", text) and evs[-1].finish_reason == "stop"


def test_constrained_and_free_requests_share_steps(tiny_engine):
    e = tiny_engine
    free = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = [ev.token_id for ev in e.generate("Hello there", free)]
    hs = [e.submit(e.tokenizer.encode("JSON please"), SamplingParams(max_tokens=300, temperature=0,
                                                                    constraint=Constraint("json_schema", SCHEMA))),
          e.submit(e.tokenizer.encode("Hello there"), free),
          e.submit(e.tokenizer.encode("More"), SamplingParams(max_tokens=30, temperature=1.0, seed=4,
                                                             constraint=Constraint("regex", "[ab]{5,20}")))]
    while not all(h.finished for h in hs):
        e.step()
    schema_text, free_evs, regex_text = "".join(ev.text for ev in hs[0]), list(hs[1]), "".join(ev.text for ev in hs[2])
    jsonschema.validate(json.loads(schema_text), SCHEMA)
    assert [ev.token_id for ev in free_evs] == alone
    assert re.fullmatch("[ab]{5,20}", regex_text)


def test_bad_grammars_are_refused_at_submit(tiny_engine):
    ids = tiny_engine.tokenizer.encode("x")
    with pytest.raises(EngineError, match="regex"):
        tiny_engine.submit(ids, SamplingParams(constraint=Constraint("regex", "(unclosed")))
    with pytest.raises(EngineError, match="lark"):
        tiny_engine.submit(ids, SamplingParams(constraint=Constraint("lark", "start: undefined_rule\n")))
    with pytest.raises(EngineError, match="kind"):
        Constraint("yaml", "x")
    with pytest.raises(EngineError, match="schema"):
        Constraint("json_schema", "not an object")
    assert tiny_engine.stats()["running"] == 0


def test_apply_bitmask_keeps_exactly_the_allowed_tokens():
    V = 70  # not a multiple of 32: the last word is partial
    allowed = [0, 1, 31, 32, 63, 64, 69]
    words = torch.zeros(2, 3, dtype=torch.int32)
    for t in allowed:
        words[0, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    words[1] = -1  # everything
    logits = torch.randn(2, V)
    before = logits.clone()
    apply_bitmask(logits, words)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == allowed
    torch.testing.assert_close(logits[0, allowed], before[0, allowed])
    torch.testing.assert_close(logits[1], before[1])
