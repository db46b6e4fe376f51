"""The OpenAI API's newer routes and fields through a real gateway and its workers, with the
real openai client, on the tiny demo model (random weights: what it says is gibberish, but every
grammar holds and every shape must parse): tools and tool_choice (whole and streamed),
response_format, embeddings (against the engine's own pooling in this process), the Responses
API, /tokenize and /detokenize, the small routes, CORS, and the metrics in vLLM's names."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.serve._helpers import API_KEY, Gateway

TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                      "required": ["a", "b"], "additionalProperties": False}}}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
MSGS = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def gw(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    g = Gateway({"server": {"api_keys": [API_KEY], "metrics_auth": False, "cors": {"allow_origins": ["https://app.example"]},
                            "responses_store": {"max_items": 3, "ttl": "1h"}},
                 "models": [{"path": tiny_model, "name": "gen", "idle_timeout": 120},
                            {"path": tiny_model, "name": "emb", "idle_timeout": 120,
                             "embedding": {"pooling": "mean"}}]},
                str(tmp_path_factory.mktemp("gw")), api_key=API_KEY)
    yield g
    g.stop()


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _schema_of(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_whole(gw: Gateway, choice) -> None:
    r = gw.openai().chat.completions.create(model="gen", messages=MSGS, tools=TOOLS, tool_choice=choice,
                                            max_tokens=350, temperature=0)
    calls = _calls(r.choices[0].message)
    assert calls, r
    for name, args in calls:
        jsonschema.validate(args, _schema_of(name))  # the grammar held every call to its tool's schema
    if isinstance(choice, dict):
        assert [n for n, _ in calls] == ["add"] and r.choices[0].finish_reason == "stop"  # as OpenAI, for a named tool
    else:
        assert r.choices[0].finish_reason in ("tool_calls", "length")
    assert all(c.id.startswith("call_") and c.type == "function" for c in r.choices[0].message.tool_calls)


def test_forced_tool_calls_streamed_in_openai_delta_shape(gw: Gateway) -> None:
    client = gw.openai()
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(model="gen", messages=MSGS, tools=TOOLS, tool_choice=choice, max_tokens=350,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model="gen", messages=MSGS, tools=TOOLS, tool_choice=choice,
                                                 max_tokens=350, temperature=0, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert deltas and all(d.index == 0 for d in deltas)
    name = "".join(d.function.name or "" for d in deltas)
    args = "".join(d.function.arguments or "" for d in deltas)
    assert (name, json.loads(args)) == _calls(whole.choices[0].message)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_auto_and_none_tool_choice(gw: Gateway) -> None:
    client = gw.openai()
    # auto: the model may answer in text (random weights: it does); its text is content, nothing parsed away
    r = client.chat.completions.create(model="gen", messages=MSGS, tools=TOOLS, max_tokens=12, temperature=0)
    m = r.choices[0].message
    assert m.tool_calls is None and isinstance(m.content, str)
    plain = client.chat.completions.create(model="gen", messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=12,
                                           temperature=0)
    no_tools = client.chat.completions.create(model="gen", messages=MSGS, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == no_tools.choices[0].message.content  # none: the tools are not shown
    assert plain.usage.prompt_tokens == no_tools.usage.prompt_tokens < r.usage.prompt_tokens


def test_tool_round_trip_messages_render(gw: Gateway) -> None:
    client = gw.openai()
    r = client.chat.completions.create(model="gen", messages=MSGS, tools=TOOLS, tool_choice="required", max_tokens=350,
                                       temperature=0)
    call = r.choices[0].message.tool_calls[0]
    follow = MSGS + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "12 C and sunny"}]
    again = client.chat.completions.create(model="gen", messages=follow, tools=TOOLS, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens + 5


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
    {"type": "json_object"}])
def test_response_format(gw: Gateway, fmt) -> None:
    client = gw.openai()
    r = client.chat.completions.create(model="gen", messages=[{"role": "user", "content": "A person as JSON"}],
                                       response_format=fmt, max_tokens=350, temperature=0)
    assert r.choices[0].finish_reason == "stop", r  # the grammar closed the object before max_tokens
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value, dict)
    if fmt["type"] == "json_schema":
        jsonschema.validate(value, SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="gen", messages=[{"role": "user", "content": "A person as JSON"}], response_format=fmt, max_tokens=350,
        temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content
    text = client.completions.create(model="gen", prompt="JSON:", max_tokens=350, temperature=0,
                                     extra_body={"response_format": fmt})
    assert isinstance(json.loads(text.choices[0].text), dict)


@pytest.mark.parametrize("body, word", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_and_format_requests_are_refused_by_name(gw: Gateway, body, word) -> None:
    with pytest.raises(openai.BadRequestError, match=word):
        gw.openai().chat.completions.create(model="gen", messages=MSGS, max_tokens=4, extra_body=body)


def test_embeddings_match_the_engine_and_encode(gw: Gateway, ref) -> None:
    from zerostart.engine import PoolingParams

    client = gw.openai()
    texts = ["scale to zero", "and come back fast"]
    r = client.embeddings.create(model="emb", input=texts)
    assert [d.index for d in r.data] == [0, 1] and r.model == "emb"
    expected = []
    for t in texts:
        ids = ref.tokenizer.encode(t)
        (ev,) = list(ref.generate(ids, PoolingParams("mean")))
        expected.append(ev.embedding)
    for got, want in zip(r.data, expected):
        assert max(abs(a - b) for a, b in zip(got.embedding, want)) < 1e-5
    assert r.usage.prompt_tokens == sum(len(ref.tokenizer.encode(t)) for t in texts)
    raw = gw.http.post("/v1/embeddings", json={"model": "emb", "input": texts[0], "encoding_format": "base64",
                                               "dimensions": 8}).json()
    vec = struct.unpack("<8f", base64.b64decode(raw["data"][0]["embedding"]))
    assert abs(sum(v * v for v in vec) - 1) < 1e-5  # truncated, then normalized again
    short = client.embeddings.create(model="emb", input=texts[0], dimensions=8)  # the SDK decodes base64 itself
    assert max(abs(a - b) for a, b in zip(short.data[0].embedding, vec)) < 1e-6
    tokens = client.embeddings.create(model="emb", input=[ref.tokenizer.encode(texts[0])])
    assert max(abs(a - b) for a, b in zip(tokens.data[0].embedding, expected[0])) < 1e-5


def test_models_of_the_wrong_kind_are_refused_before_a_start(gw: Gateway) -> None:
    client = gw.openai()
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model="emb", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="not served as an embedding model"):
        client.embeddings.create(model="gen", input="x")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="emb", input="x", dimensions=10**6)


def test_tokenize_and_detokenize(gw: Gateway, ref) -> None:
    def counted() -> dict[Any, float]:
        return {k: v for k, v in gw.metrics().items() if k[0] == "zerostart_requests_total"}

    before = counted()
    out = gw.http.post("/tokenize", json={"model": "gen", "prompt": "Hello world", "return_token_strs": True}).json()
    assert out["tokens"] == ref.tokenizer.encode("Hello world") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == ref.max_model_len and len(out["token_strs"]) == out["count"]
    assert gw.http.post("/detokenize", json={"model": "gen", "tokens": out["tokens"]}).json() == {
        "prompt": ref.tokenizer.decode(out["tokens"])}
    r = gw.http.post("/tokenize", json={"prompt": "x"})  # two models: which one?
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    assert counted() == before  # zerostart_requests_total counts the /v1/ routes only, as docs/serve.md says


def test_small_routes_models_and_unknown_routes(gw: Gateway, tiny_model: str) -> None:
    assert gw.http.get("/version").json()["version"]
    assert httpx.get(gw.url + "/ping").status_code == 200  # open, like /health
    cards = {m.id: m for m in gw.openai().models.list().data}
    assert cards["gen"].root == tiny_model and cards["gen"].parent is None
    gw.openai().completions.create(model="gen", prompt="x", max_tokens=1)
    assert gw.openai().models.retrieve("gen").max_model_len > 0  # reported by its replica once it ran
    r = gw.http.post("/v1/audio/speech", json={})
    assert r.status_code == 404 and "/v1/audio/speech" in r.json()["error"]["message"]


def test_cors_when_configured(gw: Gateway) -> None:
    pre = httpx.options(gw.url + "/v1/chat/completions", headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(gw.url + "/v1/models", headers={"origin": "https://evil.example",
                                                          "access-control-request-method": "GET"})
    assert "access-control-allow-origin" not in other.headers
    r = gw.http.get("/v1/models", headers={"origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_responses_text_stream_store_and_previous_response(gw: Gateway) -> None:
    client = gw.openai()
    first = client.responses.create(model="gen", input="Hello", instructions="Be brief", max_output_tokens=6,
                                    temperature=0)
    assert first.status in ("completed", "incomplete") and first.output_text == first.output[0].content[0].text
    assert client.responses.retrieve(first.id).id == first.id
    second = client.responses.create(model="gen", input="And again", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens  # the history went along
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError, match="responses_store"):
        client.responses.create(model="gen", input="x", previous_response_id=first.id)
    events = list(client.responses.create(model="gen", input="Hello", instructions="Be brief", max_output_tokens=6,
                                          temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == first.output_text
    tool = {"type": "function", "name": "get_weather", "parameters": _schema_of("get_weather")}
    called = client.responses.create(model="gen", input="Weather in Oslo?", tools=[tool], tool_choice="required",
                                     max_output_tokens=350, temperature=0)
    call = next(o for o in called.output if o.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), _schema_of("get_weather"))
    answer = client.responses.create(model="gen", previous_response_id=called.id, tools=[tool], max_output_tokens=6,
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12 C"}])
    assert answer.status in ("completed", "incomplete") and answer.previous_response_id == called.id
    for _ in range(3):  # the store holds 3: the oldest go
        client.responses.create(model="gen", input="x", max_output_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_metrics_in_vllms_names_open_without_key(gw: Gateway) -> None:
    client = gw.openai()
    before = gw.metrics()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return gw.metrics().get(key, 0.0) - before.get(key, 0.0)

    r = client.completions.create(model="gen", prompt="count the tokens", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    list(client.chat.completions.create(model="gen", messages=MSGS, max_tokens=5, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True}))
    assert delta("vllm:generation_tokens_total", model_name="gen") == 12
    assert delta("vllm:prompt_tokens_total", model_name="gen") >= r.usage.prompt_tokens + 1
    assert delta("vllm:request_success_total", model_name="gen", finished_reason="length") == 2
    assert delta("vllm:inter_token_latency_seconds_count", model_name="gen") == 6 + 4  # gaps between tokens
    assert delta("vllm:time_to_first_token_seconds_count", model_name="gen") == 2
    assert delta("vllm:request_queue_time_seconds_count", model_name="gen") == 2
    assert delta("vllm:e2e_request_latency_seconds_count", model_name="gen") == 2
    m = gw.metrics()
    assert ("vllm:num_requests_waiting", (("model_name", "gen"),)) in m
    assert m[("process_resident_memory_bytes", ())] > 0  # the process collector
    assert httpx.get(gw.url + "/metrics").status_code == 200  # metrics_auth: false
    assert httpx.get(gw.url + "/v1/models").status_code == 401  # the API still needs the key
