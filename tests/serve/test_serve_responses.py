"""The Responses API's translation to and from chat completions, checked against the openai
SDK's own types (every object and stream event must parse as the SDK's pydantic models), its
strict body, and the bounded store of each tenant."""

import json
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from zerostart.serve.edge import ResponsesRequest, Tenant
from zerostart.serve.gateway._responses import EventStream, chat_request, from_chat, input_messages
from zerostart.serve.gateway._responses_store import ResponseStore

openai_types = pytest.importorskip("openai.types.responses")

TOOL = {"type": "function", "name": "get_weather", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _req(**kw):
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **kw})


def _items(items: list[dict[str, Any]]) -> Any:
    return _req(input=items).input


def test_input_items_become_chat_messages():
    msgs = input_messages(_items([
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather in "},
                                                        {"type": "input_text", "text": "Oslo?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Bergen"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "12 C"},
    ]))
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[1] == {"role": "user", "content": "weather in Oslo?"}
    assert [c["id"] for c in msgs[2]["tool_calls"]] == ["c1", "c2"]  # consecutive calls: one assistant turn
    assert msgs[3] == {"role": "tool", "tool_call_id": "c1", "content": "12 C"}
    with pytest.raises(ValueError, match="input_image"):  # a ValidationError
        input_messages(_items([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]))


def test_chat_request_carries_every_field():
    req = _req(instructions="sys", tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"},
               max_output_tokens=20, temperature=0.5, stream=True,
               text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}})
    body, conversation = chat_request(req, [{"role": "user", "content": "before"}, {"role": "assistant", "content": "ok"}])
    assert body["messages"][0] == {"role": "system", "content": "sys"}
    assert [m["content"] for m in body["messages"][1:]] == ["before", "ok", "hi"]
    assert conversation == body["messages"][1:]  # instructions are not remembered
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["max_completion_tokens"] == 20 and body["temperature"] == 0.5
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                              "strict": True}}
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("bad, word", [({"tools": [{"type": "web_search"}]}, "web_search"),
                                       ({"reasoning": {"effort": "high"}}, "reasoning"),
                                       ({"include": ["file_search_call.results"]}, "include")])
def test_unsupported_fields_are_refused_by_name(bad, word):
    with pytest.raises(ValidationError, match=word):
        _req(**bad)


def test_whole_response_parses_as_the_sdks_response():
    chat = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
    body, remembered = from_chat(_req(tools=[TOOL]), chat)
    r = openai_types.Response.model_validate(body)
    assert r.output_text == "Checking." and r.status == "completed"
    assert r.output[1].type == "function_call" and r.output[1].call_id == "call_1"
    assert r.usage.total_tokens == 15
    assert remembered["tool_calls"][0]["id"] == "call_1"
    short, _ = from_chat(_req(), {"choices": [{"index": 0, "finish_reason": "length", "message": {"content": "a"}}]})
    assert openai_types.Response.model_validate(short).incomplete_details.reason == "max_output_tokens"


def _frames(raw: list[bytes]):
    adapter = TypeAdapter(openai_types.ResponseStreamEvent)
    out = []
    for frame in raw:
        head, data = frame.decode().strip().split("\n")
        ev = adapter.validate_python(json.loads(data.removeprefix("data: ")))
        assert head == f"event: {ev.type}"
        out.append(ev)
    return out


def test_stream_events_parse_as_the_sdks_events():
    s = EventStream(_req(tools=[TOOL]))
    raw = s.start()
    chunks: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                                            "function": {"name": "get_weather",
                                                                         "arguments": '{"city": "Oslo"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}]
    for chunk in chunks:
        raw += s.chunk(chunk)
    done, body, remembered = s.finish()
    events = _frames(raw + done)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Hel", "lo"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == "Hello" and final.output[1].name == "get_weather" and final.usage.total_tokens == 7
    assert remembered == {"role": "assistant", "content": "Hello", "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}


A, B = Tenant("a"), Tenant("b")


def test_store_is_bounded_by_count_and_age(monkeypatch):
    import zerostart.serve.gateway._responses_store as mod

    now = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    store = ResponseStore(max_items=2, ttl_s=60, max_bytes=1 << 20)
    for i in range(3):
        store.put(A, {"id": f"r{i}"}, [])
    assert store.get(A, "r0") is None and store.get(A, "r1") is not None and len(store) == 2
    now[0] += 61
    assert store.get(A, "r2") is None and len(store) == 0 and store.bytes == 0
