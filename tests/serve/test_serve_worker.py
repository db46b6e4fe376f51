"""A worker's OpenAI routes in this process, over a real tiny engine: what they do to the event
loop they share with every other request of the worker."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.requests import Request

from zerostart.serve.worker._openai import OpenAIRoutes


@pytest.fixture(scope="module")
def routes(tiny_model: str):
    from zerostart.engine import Engine

    engine = Engine.from_pretrained(tiny_model)
    engine.start()
    yield OpenAIRoutes(engine, "tiny")
    engine.stop()


def _request(body: dict) -> Request:
    raw = json.dumps(body).encode()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive)


async def _with_ticks(coro):
    """``await coro`` while a ticker measures how late the event loop runs: (result, seconds, worst lag)."""
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t0 - 0.01)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    try:
        out = await coro
    finally:
        tick.cancel()
    return out, time.perf_counter() - t0, max(lags)


def test_a_large_prompt_is_parsed_and_tokenized_off_the_event_loop(routes: OpenAIRoutes) -> None:
    """~4 MB of prompt: seconds of parsing and tokenizing, during which the event loop keeps
    running (it stood still for all of it when the tokenizer held the GIL on the loop)."""
    prompt = {"model": "tiny", "prompt": "hello world, tokens " * 200_000, "max_tokens": 1}
    response, took, worst = asyncio.run(_with_ticks(routes.completions(_request(prompt))))
    assert response.status_code == 400  # far past the context
    assert took > 1.0 and worst < min(0.5, took / 4), (took, worst)


def _schema(properties: int) -> dict:
    """A JSON schema whose grammar takes llguidance about a second per 1,500 properties to compile
    (the time grows faster than the size), a few KB per hundred."""
    return {"type": "object", "properties": {f"field_{i}": {"type": "integer"} for i in range(properties)}}


def _structured(schema: dict) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}}


def test_a_grammar_past_its_time_budget_is_a_400_and_never_holds_the_event_loop(routes: OpenAIRoutes) -> None:
    """A schema of 2,500 properties takes seconds to compile: it is compiled on a thread while
    the loop keeps running (it held the loop for all of it, so the gateway's probe went
    unanswered), and past the budget the request is answered 400 naming the setting."""
    from zerostart.serve.worker._structured import GrammarBudget

    tight = OpenAIRoutes(routes.engine, "tiny", grammar_budget=GrammarBudget(timeout=0.3))
    try:
        response, took, worst = asyncio.run(_with_ticks(tight.chat(_request(_structured(_schema(2500))))))
    finally:
        tight.grammars.close()
    body = json.loads(bytes(response.body))
    assert response.status_code == 400, body
    assert "server.grammar_timeout" in body["error"]["message"] and body["error"]["param"] == "response_format", body
    assert body["error"]["code"] == "grammar_too_complex"
    assert took < 2.0 and worst < 0.25, (took, worst)


def test_a_grammar_past_its_size_budget_is_a_400_naming_the_setting(routes: OpenAIRoutes) -> None:
    from zerostart.serve.worker._structured import GrammarBudget

    small = OpenAIRoutes(routes.engine, "tiny", grammar_budget=GrammarBudget(max_bytes=10_000))
    try:
        response = asyncio.run(small.chat(_request(_structured(_schema(500)))))  # ~13 KB
        tools = [{"type": "function", "function": {"name": "f", "parameters": _schema(500)}}]
        forced = asyncio.run(small.chat(_request({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                  "tools": tools, "tool_choice": "required", "max_tokens": 4})))
    finally:
        small.grammars.close()
    body = json.loads(bytes(response.body))
    assert response.status_code == 400 and body["error"]["code"] == "grammar_too_large", body
    assert "server.max_grammar_bytes" in body["error"]["message"] and "10000 bytes" in body["error"]["message"], body
    body = json.loads(bytes(forced.body))  # a forced tool call's grammar (the tools' schemas within): the same limit
    assert forced.status_code == 400 and body["error"]["param"] == "tools", body
    assert "server.max_grammar_bytes" in body["error"]["message"], body


def test_a_compiled_grammar_serves_every_choice_and_the_next_request(routes: OpenAIRoutes) -> None:
    """Compiled once (off the loop) and copied for each of n choices: every choice is held to
    the schema on its own; the same schema again (compiled already) gives the same answers."""
    schema = {**_schema(300), "additionalProperties": False}
    request = {**_structured(schema), "n": 3, "max_tokens": 400, "temperature": 1.0, "seed": 1}
    first = asyncio.run(routes.chat(_request(request)))
    again = asyncio.run(routes.chat(_request(request)))
    for response in (first, again):
        body = json.loads(bytes(response.body))
        assert response.status_code == 200 and len(body["choices"]) == 3, body
        for choice in body["choices"]:
            if choice["finish_reason"] == "stop":  # complete: it matches the schema
                out = json.loads(choice["message"]["content"])
                assert isinstance(out, dict) and set(out) <= set(schema["properties"]), out
    assert json.loads(bytes(first.body))["choices"] == json.loads(bytes(again.body))["choices"]  # seeded
