"""The real model (SmolLM2-135M-Instruct): log-probabilities against transformers within 1e-3,
structured output and a forced tool call through the chat template's tool fallback."""

import json

import pytest
import torch

from zerostart.engine import Constraint, Engine, EngineConfig, SamplingParams, render_chat, tool_parser

pytestmark = pytest.mark.slow
jsonschema = pytest.importorskip("jsonschema")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(smollm2_dir):
    engine = Engine.from_pretrained(smollm2_dir, config=EngineConfig(max_num_seqs=4, prefill_chunk=64,
                                                                     max_model_len=1024))
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    yield engine, model
    engine.stop()


def _chat(engine, text):
    return engine.tokenizer.encode(render_chat(engine.tokenizer, [{"role": "user", "content": text}]),
                                   add_special_tokens=False)


def test_logprobs_match_transformers_within_1e3(pair):
    engine, model = pair
    ids = _chat(engine, "Name three colors of the rainbow.")
    evs = list(engine.generate(ids, SamplingParams(max_tokens=16, temperature=0, logprobs=5, prompt_logprobs=1)))
    out = [ev.token_id for ev in evs]
    with torch.no_grad():
        ref = model(torch.tensor([ids + out])).logits[0].float().log_softmax(-1)
    gen = torch.tensor([ev.logprob.logprob for ev in evs])
    torch.testing.assert_close(gen, ref[torch.arange(len(ids) - 1, len(ids) - 1 + len(out)), out], atol=1e-3, rtol=0)
    for i, ev in enumerate(evs):
        assert [t for t, _ in ev.logprob.top] == ref[len(ids) - 1 + i].topk(5).indices.tolist()
    plp = evs[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(ids)  # prompt_len > prefill_chunk: several chunks
    got = torch.tensor([p.logprob for p in plp[1:]])
    torch.testing.assert_close(got, ref[torch.arange(len(ids) - 1), ids[1:]], atol=1e-3, rtol=0)


def test_json_schema_from_the_real_model(pair):
    engine, _ = pair
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"], "additionalProperties": False}
    ids = _chat(engine, "Describe Paris as JSON with city, country and population_millions.")
    evs = list(engine.generate(ids, SamplingParams(max_tokens=80, temperature=0,
                                                   constraint=Constraint("json_schema", schema))))
    text = "".join(ev.text for ev in evs)
    assert evs[-1].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_forced_tool_call_round_trip(pair):
    engine, _ = pair
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    tok = engine.tokenizer
    parser = tool_parser(None, tok, tok.get_chat_template())
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    prompt = render_chat(tok, messages, tools=tools)
    assert "<tools>" in prompt  # SmolLM2's template knows no tools: the Hermes fallback
    evs = list(engine.generate(tok.encode(prompt, add_special_tokens=False), SamplingParams(
        max_tokens=60, temperature=0, constraint=Constraint("lark", parser.grammar(tools, "get_weather")))))
    content, calls = parser.parse("".join(ev.text for ev in evs))
    assert content is None and [c.name for c in calls] == ["get_weather"]
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    # the answer goes back as a tool message and renders for the next turn
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C, sunny"}]
    follow = render_chat(tok, messages, tools=tools)
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in follow
    reply = "".join(ev.text for ev in engine.generate(tok.encode(follow, add_special_tokens=False),
                                                      SamplingParams(max_tokens=30, temperature=0)))
    assert reply.strip()
