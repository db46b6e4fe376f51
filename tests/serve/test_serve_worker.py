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


def test_a_large_prompt_is_parsed_and_tokenized_off_the_event_loop(routes: OpenAIRoutes) -> None:
    """~4 MB of prompt: seconds of parsing and tokenizing, during which the event loop keeps
    running (it stood still for all of it when the tokenizer held the GIL on the loop)."""

    async def main() -> tuple[int, float, float]:
        lags: list[float] = []

        async def ticker() -> None:
            while True:
                t0 = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - t0 - 0.01)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        response = await routes.completions(_request({"model": "tiny", "prompt": "hello world, tokens " * 200_000,
                                                      "max_tokens": 1}))
        took = time.perf_counter() - t0
        tick.cancel()
        return response.status_code, took, max(lags)

    status, took, worst = asyncio.run(main())
    assert status == 400  # far past the context
    assert took > 1.0 and worst < min(0.5, took / 4), (took, worst)
