"""End to end: the real openai client against a real gateway with real worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.serve._helpers import API_KEY, Gateway, pid_alive

MODELS: dict[str, dict[str, Any]] = {
    # name: extra model settings
    "api": {"idle_timeout": 120},
    "lifecycle": {"idle_timeout": 1},
    "burst": {"idle_timeout": 2},
    "small-queue": {"idle_timeout": 2, "max_queued": 100},
    "held": {"idle_timeout": 1},
    "keepalive": {"idle_timeout": 120},
    "stopping": {"idle_timeout": 0.5, "stop_timeout": 4},
    "par-a": {"idle_timeout": 1},
    "par-b": {"idle_timeout": 1},
}


@pytest.fixture(scope="module")
def gw(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "server": {"api_keys": [API_KEY], "stream_keepalive": 0.25},
        "models": [{"path": tiny_model, "name": name, **extra} for name, extra in MODELS.items()],
    }
    g = Gateway(config, str(tmp_path_factory.mktemp("gw")), api_key=API_KEY)
    yield g
    pids = [w["pid"] for m in g.status()["models"] for w in m["workers"]]
    g.stop()
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly
    assert g.proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in g.tail(), g.tail()
    for pid in pids:  # shutdown stops every worker
        assert not pid_alive(pid)


def test_models_health_and_auth(gw: Gateway) -> None:
    assert sorted(m.id for m in gw.openai().models.list().data) == sorted(MODELS)
    assert httpx.get(gw.url + "/health").json()["status"] == "ok"  # open without a key
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = httpx.post(gw.url + "/v1/completions", json={"model": "api", "prompt": "x"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["x-zerostart-cold-start-ms"] == "0"
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    assert all(m["state"] == "zero" for m in gw.status()["models"])  # nothing started by any of this


def test_chat_and_completions_streamed_and_not(gw: Gateway) -> None:
    client = gw.openai()
    raw = client.completions.with_raw_response.create(model="api", prompt="Hello there", max_tokens=5,
                                                      temperature=0.7, top_p=0.9, seed=3)
    assert int(raw.headers["x-zerostart-cold-start-ms"]) > 0  # this one paid the cold start
    c = raw.parse()
    assert c.model == "api" and c.object == "text_completion" and len(c.choices) == 1
    assert c.usage.completion_tokens <= 5 and c.usage.prompt_tokens > 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

    raw = client.chat.completions.with_raw_response.create(
        model="api", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, seed=7, temperature=1.0)
    assert raw.headers["x-zerostart-cold-start-ms"] == "0"  # hot now
    chat = raw.parse()
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 6

    # seed makes sampling reproducible; streamed text equals the unstreamed text
    kw = dict(model="api", messages=[{"role": "user", "content": "Tell me"}], max_tokens=8, seed=11, temperature=1.0)
    whole = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    kw = dict(model="api", prompt="Once upon", max_tokens=7, seed=5)
    whole_c = client.completions.create(**kw)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(stream=True, **kw))
    assert streamed == whole_c.choices[0].text

    # stop strings are honored and never emitted
    probe = whole_c.choices[0].text
    stop = next((probe[i:i + 2] for i in range(1, len(probe) - 1) if probe[i:i + 2].strip()), None)
    if stop is not None:
        cut = client.completions.create(stop=[stop], **kw)
        assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
        assert probe.startswith(cut.choices[0].text)

    # echo puts the prompt before the completion
    echoed = client.completions.create(model="api", prompt="Echo me", max_tokens=2, seed=1, echo=True)
    assert echoed.choices[0].text.startswith("Echo me")
    assert client.models.retrieve("api").id == "api"

    # n choices and several prompts
    multi = client.completions.create(model="api", prompt=["a", "b"], n=2, max_tokens=3, seed=1)
    assert sorted(ch.index for ch in multi.choices) == [0, 1, 2, 3]
    assert gw.cold_starts("api") == 1


def test_request_errors(gw: Gateway) -> None:
    client = gw.openai()
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x")
    assert "nope" in str(missing.value) and "api" in str(missing.value)  # names the served models
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="api", prompt="x", temperature=5)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="api", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert "top_logprobs" in str(e.value)  # without logprobs: true
    with pytest.raises(openai.BadRequestError) as e:  # from the worker: the context is 1024 tokens
        client.completions.create(model="api", prompt="x", max_tokens=5000)
    assert "maximum context length" in str(e.value)
    r = gw.http.post("/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert gw.http.get("/v2/whatever").status_code == 404
    assert gw.metric("zerostart_requests_total", model="unknown", status="404") >= 1
    assert gw.metric("zerostart_requests_total", model="api", status="400") >= 3


def test_cold_hot_scale_to_zero_and_cold_again(gw: Gateway) -> None:
    client = gw.openai()
    assert gw.model("lifecycle")["state"] == "zero"
    first = client.completions.with_raw_response.create(model="lifecycle", prompt="a", max_tokens=2)
    cold_ms = int(first.headers["x-zerostart-cold-start-ms"])
    assert cold_ms > 0
    m = gw.model("lifecycle")
    assert m["state"] == "hot" and m["replicas"] == 1
    pid = m["workers"][0]["pid"]
    assert pid_alive(pid)
    phases = [p["name"] for p in m["last_cold_start"]["phases"]]
    for name in ("spawn", "import", "read", "warmup", "first_token"):
        assert name in phases, phases
    assert m["last_cold_start"]["ready_s"] * 1000 <= cold_ms + 50

    t0 = time.monotonic()
    hot = client.completions.with_raw_response.create(model="lifecycle", prompt="b", max_tokens=2)
    assert hot.headers["x-zerostart-cold-start-ms"] == "0"
    assert time.monotonic() - t0 < cold_ms / 1000

    gw.wait_for("lifecycle to scale to zero", lambda: gw.model("lifecycle")["state"] == "zero", timeout=15)
    assert time.monotonic() - t0 >= 1.0  # not before its idle timeout
    gw.wait_for("the worker process to be gone", lambda: not pid_alive(pid), timeout=5)
    assert gw.model("lifecycle")["replicas"] == 0
    assert gw.metric("zerostart_replica_stops_total", model="lifecycle", reason="idle") == 1

    again = client.completions.with_raw_response.create(model="lifecycle", prompt="c", max_tokens=2)
    assert int(again.headers["x-zerostart-cold-start-ms"]) > 0
    assert gw.model("lifecycle")["workers"][0]["pid"] != pid
    assert gw.cold_starts("lifecycle") == 2
    assert gw.phase_count("lifecycle", "import") == 2 and gw.phase_count("lifecycle", "first_token") == 2


def test_keep_alive_per_request(gw: Gateway) -> None:
    client = gw.openai()
    client.completions.create(model="keepalive", prompt="x", max_tokens=1, extra_body={"keep_alive": 0})
    gw.wait_for("keep_alive 0 to unload at once", lambda: gw.model("keepalive")["state"] == "zero", timeout=5)
    # the longest keep-alive asked for wins until it runs out: a later 0 does not unload it
    client.completions.create(model="keepalive", prompt="x", max_tokens=1, extra_body={"keep_alive": "1h"})
    client.completions.create(model="keepalive", prompt="x", max_tokens=1, extra_body={"keep_alive": 0})
    time.sleep(0.5)
    m = gw.model("keepalive")
    assert m["state"] == "hot" and m["workers"][0]["kept_for_s"] > 3500, m
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="keepalive", prompt="x", extra_body={"keep_alive": "soon"})
    assert "keep_alive" in str(e.value)


def test_500_concurrent_requests_one_cold_start(gw: Gateway) -> None:
    assert gw.model("burst")["state"] == "zero"
    results = asyncio.run(gw.burst(500, model="burst", prompt="request", max_tokens=1))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(r.parse().usage.completion_tokens == 1 for r in results)
    assert gw.cold_starts("burst") == 1
    assert gw.metric("zerostart_requests_total", model="burst", status="200") == 500
    paid = [int(r.headers["x-zerostart-cold-start-ms"]) for r in results]
    assert sum(1 for ms in paid if ms > 0) >= 250  # most arrived during the one start, and were held


def test_queue_limit_answers_429_with_retry_after(gw: Gateway) -> None:
    results = asyncio.run(gw.burst(500, model="small-queue", prompt="q", max_tokens=1))
    ok = [r for r in results if not isinstance(r, BaseException)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) + len(limited) == 500, [r for r in results if isinstance(r, BaseException)
                                           and not isinstance(r, openai.RateLimitError)][:3]
    assert len(ok) >= 100 and limited
    for e in limited:
        assert int(e.response.headers["retry-after"]) >= 1
        assert "max_queued" in e.message
    assert gw.cold_starts("small-queue") == 1
    assert gw.metric("zerostart_requests_total", model="small-queue", status="429") == len(limited)


def test_streamed_request_waiting_for_a_start_gets_keepalives(gw: Gateway) -> None:
    body = {"model": "held", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    # the openai client reads such a stream like any other; it waits for the same start
    parsed: list = []
    reader = threading.Thread(target=lambda: parsed.extend(gw.openai().chat.completions.create(
        model="held", messages=[{"role": "user", "content": "y"}], max_tokens=3, stream=True)))
    reader.start()
    with gw.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["x-zerostart-cold-start-ms"] == "pending"  # headers went out before the start ended
        lines = [line for line in r.iter_lines() if line]
    reader.join(30)
    comments = [x for x in lines if x.startswith(":")]
    data = [x for x in lines if x.startswith("data: ")]
    assert len(comments) >= 2 and lines.index(comments[0]) < lines.index(data[0])
    reported = [c for c in comments if "x-zerostart-cold-start-ms=" in c]
    assert len(reported) == 1 and int(reported[0].split("=")[1]) > 250
    assert data[-1] == "data: [DONE]"
    assert sum(1 for ch in parsed if ch.choices and ch.choices[0].finish_reason) == 1
    assert gw.cold_starts("held") == 1


def test_request_while_stopping_gets_a_fresh_start(gw: Gateway) -> None:
    client = gw.openai()
    client.completions.create(model="stopping", prompt="x", max_tokens=1)
    old = gw.model("stopping")["workers"][0]["pid"]
    os.kill(old, signal.SIGSTOP)  # it will not answer SIGTERM: it stays 'stopping' until stop_timeout
    try:
        gw.wait_for("stopping state", lambda: gw.model("stopping")["state"] == "stopping", timeout=10)
        raw = client.completions.with_raw_response.create(model="stopping", prompt="y", max_tokens=1)
        assert int(raw.headers["x-zerostart-cold-start-ms"]) > 0
        workers = {w["pid"]: w["state"] for w in gw.model("stopping")["workers"]}
        new = [pid for pid in workers if pid != old]
        assert len(new) == 1 and workers[new[0]] == "hot"
    finally:
        if pid_alive(old):
            os.kill(old, signal.SIGCONT)
    gw.wait_for("the stuck worker to be killed", lambda: not pid_alive(old), timeout=10)


def test_cold_starts_of_two_models_overlap(gw: Gateway) -> None:
    async def run() -> None:
        client = gw.async_openai()
        async with client:
            await asyncio.gather(*(client.completions.create(model=m, prompt="x", max_tokens=1) for m in ("par-a", "par-b")))

    seen: list[tuple[str, str]] = []

    async def watch(task: asyncio.Task) -> None:
        async with httpx.AsyncClient(base_url=gw.url, headers={"authorization": f"Bearer {API_KEY}"}) as c:
            while not task.done():
                models = {m["name"]: m["state"] for m in (await c.get("/zerostart/status")).json()["models"]}
                seen.append((models["par-a"], models["par-b"]))
                await asyncio.sleep(0.05)

    async def both() -> None:
        task = asyncio.create_task(run())
        await watch(task)
        await task

    asyncio.run(both())
    # neither waited behind the other's load: both were starting at the same moment
    assert ("starting", "starting") in seen, seen


def test_status_and_metrics_shape(gw: Gateway) -> None:
    # the model read below is hot however long the tests before this one took (its idle_timeout
    # is 120 s; a loaded machine runs them slower than that)
    gw.openai().completions.create(model="api", prompt="x", max_tokens=1)
    status = gw.status()
    for m in status["models"]:
        assert {"name", "state", "replicas", "queued", "last_cold_start"} <= set(m)
        assert m["state"] in ("zero", "starting", "hot", "stopping")
    api = gw.model("api")
    assert api["state"] == "hot" and api["last_cold_start"]["phases"][0]["name"] == "spawn"
    text = gw.http.get("/metrics").text
    for family in ("zerostart_requests_total", "zerostart_queue_length", "zerostart_cold_starts_total",
                   "zerostart_cold_start_phase_seconds_bucket", "zerostart_replicas",
                   "zerostart_time_to_first_token_seconds_bucket", "zerostart_model_state"):
        assert family in text, family
    assert gw.metric("zerostart_replicas", model="api", state="hot") == 1
    assert gw.metric("zerostart_model_state", model="api", state="hot") == 1
    assert gw.metric("zerostart_time_to_first_token_seconds_count", model="api") >= 2
