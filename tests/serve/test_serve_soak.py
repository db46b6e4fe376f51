"""The soak test (issue 15): thousands of requests mixing valid, malformed, abandoned and streamed
ones, Responses (stored, chained, streamed and not) and embeddings, from two tenants, against a
real gateway, while its workers are killed at random. Every request is answered and counted
once, no tenant sees another's stored responses, and when it is over nothing is left: no request
in flight or queued (at the gateway or in a worker's engine), the gateway's memory bounded, and
after SIGTERM no worker process and no socket."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.serve._helpers import Gateway, pid_alive, rss, worker_client, worker_token

REQUESTS = 3000
CONCURRENCY = 40
KILL_EVERY = 600  # requests answered between two kills: four, however fast the machine runs the rest
MAX_BODY = 64 * 1024
TENANTS = ("soak-key-1", "soak-key-2")  # each key its own tenant
ADMIN = "soak-admin"  # the operators' tenant: status and metrics
RECENT = 50  # a tenant's newest stored responses, which the store's bounds must still hold
RSS_GROWTH = 64 * 2**20  # the gateway's memory after the workload, over what it was before it

MALFORMED: list[tuple[str, bytes, int]] = [  # path, body, the status it must get
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", json.dumps({"model": "a", "prompt": "x", "max_tokens": "3"}).encode(), 400),
    ("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
    ("/v1/completions", json.dumps({"model": "b", "prompt": "x" * (16 * MAX_BODY)}).encode(), 413),
    ("/v1/completions", json.dumps({"model": "a", "prompt": ["x"] * 5, "n": 2}).encode(), 400),  # 10 > max_sequences
    ("/v1/completions", json.dumps({"model": "a", "prompt": "x", "seed": 2**64}).encode(), 400),
    ("/v1/chat/completions", json.dumps({"model": "b", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(), 400),
]
# a worker killed mid-request, a start that failed or a queue that was full: a clean error, not a lost request
_FAULTS = {429, 502, 503, 504}
FAILED = "responses_failed"  # a Responses stream that ended in response.failed (counted under its own status)


class Stored:
    """The ids each tenant stored, in order."""

    def __init__(self) -> None:
        self.ids: dict[str, list[str]] = {k: [] for k in TENANTS}

    def other(self, key: str) -> str:
        return TENANTS[1 - TENANTS.index(key)]


def _valid(rng: random.Random, stream: bool, max_tokens: int, responses: bool = False) -> tuple[str, bytes]:
    model = rng.choice("ab")
    if responses and rng.random() < 0.2:
        return "/v1/responses", json.dumps({"model": model, "input": f"hello {rng.random()}", "stream": stream,
                                            "max_output_tokens": max_tokens}).encode()
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(2**63)
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": f"hello {rng.random()}"}]
        return "/v1/chat/completions", json.dumps(body).encode()
    body["prompt"] = f"once upon {rng.random()}"
    return "/v1/completions", json.dumps(body).encode()


async def _one(client: httpx.AsyncClient, port: int, rng: random.Random, i: int, stored: Stored) -> str:
    """Send request ``i`` (one POST) and return how it ended, as the gateway counts it: its
    status, or ``abandoned`` (failing the test on an answer that is wrong)."""
    kind = rng.choices(["whole", "stream", "malformed", "abandoned", "response", "chain", "embeddings"],
                       [30, 15, 20, 12, 10, 5, 8])[0]
    key = rng.choice(TENANTS)
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    if kind in ("response", "chain"):
        return await _response(client, rng, i, key, headers, stored, chain=kind == "chain")
    if kind == "embeddings":
        body = {"model": "e", "input": [f"text {rng.random()}" for _ in range(rng.randint(1, 8))]}
        r = await client.post("/v1/embeddings", json=body, headers=headers)
        assert r.status_code == 200 or r.status_code in _FAULTS, (i, r.status_code, r.text[:200])
        if r.status_code == 200:
            assert len(r.json()["data"]) == len(body["input"])
        return str(r.status_code)
    if kind == "malformed":
        path, raw, want = rng.choice(MALFORMED)
        r = await client.post(path, content=raw, headers=headers)
        assert r.status_code == want and r.json()["error"]["message"], (i, path, r.status_code, r.text[:200])
        return str(want)
    if kind == "abandoned":
        # sent whole, then the client goes away without reading (an ordinary close: the
        # gateway reads the request, then sees it leave)
        path, raw = _valid(rng, stream=rng.random() < 0.5, max_tokens=200, responses=True)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"authorization: Bearer {key}\r\ncontent-length: {len(raw)}\r\n\r\n".encode() + raw)
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.0, 0.6))
        writer.close()
        await writer.wait_closed()
        return "abandoned"
    path, raw = _valid(rng, stream=kind == "stream", max_tokens=rng.randint(1, 4))
    if kind == "whole":
        r = await client.post(path, content=raw, headers=headers)
        assert r.headers["content-type"] == "application/json", (i, r.status_code, r.text[:200])
        assert r.status_code == 200 or r.status_code in _FAULTS, (i, r.status_code, r.text[:200])
        return str(r.status_code)
    async with client.stream("POST", path, content=raw, headers=headers) as r:
        text = (await r.aread()).decode()
    if r.status_code != 200:
        assert r.status_code in _FAULTS and json.loads(text)["error"], (i, r.status_code, text[:200])
        return str(r.status_code)
    events = [e for e in text.split("\n\n") if e.startswith("data: ")]
    assert events and events[-1] == "data: [DONE]", (i, text[-300:])  # whole, or ended by an error event
    return "stream_error" if any('"error"' in e for e in events) else "200"


async def _response(client: httpx.AsyncClient, rng: random.Random, i: int, key: str, headers: dict[str, str],
                    stored: Stored, chain: bool) -> str:
    """A Responses request, stored (streamed or not), or continuing a stored one: the tenant's
    own (served), or another tenant's (a 404, as a missing id)."""
    metadata = {"soak": str(i), **{f"pad{j}": "x" * 500 for j in range(15)}}  # 8 kB: the store fills (2 MiB)
    body: dict[str, Any] = {"model": rng.choice("ab"), "input": f"say {rng.random()}", "max_output_tokens": 3,
                            "stream": rng.random() < 0.4, "metadata": metadata}
    theirs = False
    if chain:
        theirs = rng.random() < 0.5
        ids = stored.ids[stored.other(key) if theirs else key]
        if not ids:
            return await _response(client, rng, i, key, headers, stored, chain=False)
        body["previous_response_id"] = ids[-1]
    if not body["stream"]:
        r = await client.post("/v1/responses", json=body, headers=headers)
        if theirs:
            assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found", (i, r.text[:200])
            return "404"
        assert r.status_code == 200 or r.status_code in _FAULTS, (i, r.status_code, r.text[:200])
        if r.status_code == 200:
            assert r.json()["metadata"] == metadata
            stored.ids[key].append(r.json()["id"])
        return str(r.status_code)
    async with client.stream("POST", "/v1/responses", json=body, headers=headers) as r:
        text = (await r.aread()).decode()
    if r.status_code != 200:
        assert (r.status_code == 404 if theirs else r.status_code in _FAULTS), (i, r.status_code, text[:200])
        return str(r.status_code)
    assert not theirs, (i, text[:300])
    data = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    last = data[-1]
    if last.get("type") in ("response.completed", "response.incomplete"):
        stored.ids[key].append(last["response"]["id"])
        return "200"
    assert last.get("type") == "response.failed" or "error" in last, (i, text[-300:])  # failed, or ended by Guard
    return FAILED


def _check_tenants(gw: Gateway, stored: Stored) -> None:
    """Each tenant reads its newest stored responses, its oldest are gone (the store is full:
    its 2 MiB hold about 240); the other tenant gets 404 for every one."""
    for key, ids in stored.ids.items():
        with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as own, \
                httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {stored.other(key)}"},
                             timeout=30) as other:
            for rid in ids[-RECENT:]:
                assert own.get(f"/v1/responses/{rid}").status_code == 200, rid
            assert own.get(f"/v1/responses/{ids[0]}").status_code == 404  # evicted by the byte bound
            for rid in ids:
                assert other.get(f"/v1/responses/{rid}").status_code == 404, rid
                assert other.delete(f"/v1/responses/{rid}").status_code == 404, rid


async def _workload(gw: Gateway, seen_pids: set[int], stored: Stored, seed: int = 15) -> Counter[str]:
    rng = random.Random(seed)
    port = int(gw.url.rsplit(":", 1)[1])
    # httpx's default keep-alive expiry (5 s); the oversized bodies' 413s come before their bodies are read
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    killing = True

    answered = 0

    async def killer() -> None:
        due = KILL_EVERY
        while killing:
            await asyncio.sleep(0.05)
            if answered < due:
                continue
            status = (await client.get("/zerostart/status")).json()
            live = [w["pid"] for m in status["models"] for w in m["workers"] if w["state"] == "hot"]
            if live and killing:
                os.kill(rng.choice(live), signal.SIGKILL)
                due += KILL_EVERY

    async def bounded(i: int, r: random.Random) -> str:
        nonlocal answered
        async with gate:
            status = (await client.get("/zerostart/status")).json() if i % 50 == 0 else None
            if status is not None:
                seen_pids.update(w["pid"] for m in status["models"] for w in m["workers"] if w["pid"])
            outcome = await _one(client, port, r, i, stored)
        answered += 1
        return outcome

    async with httpx.AsyncClient(base_url=gw.url, limits=limits, timeout=90,
                                 headers={"authorization": f"Bearer {ADMIN}"}) as client:
        kill_task = asyncio.create_task(killer())
        try:
            outcomes = await asyncio.gather(*(bounded(i, random.Random(rng.random())) for i in range(REQUESTS)))
        finally:
            killing = False
            kill_task.cancel()
    return Counter(outcomes)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak(tiny_model: str, tmp_path) -> None:
    config = {
        "server": {"stream_keepalive": 0.25, "request_timeout": 60, "worker_probe_timeout": 5, "shutdown_timeout": 5,
                   "standby_workers": 1,  # a killed worker is replaced by the spare (and the spare replenished)
                   "max_body_bytes": MAX_BODY, "max_sequences": 8, "api_keys": list(TENANTS),
                   "tenants": [{"name": "ops", "keys": [ADMIN], "admin": True}],
                   "responses_store": {"max_items": 100_000, "max_bytes": "2MiB"}},  # full: the oldest go
        "models": [{"path": tiny_model, "name": "a", "max_replicas": 2, "max_concurrency": 16, "idle_timeout": 300,
                    "start_backoff": 0.5, "start_backoff_max": 1},
                   {"path": tiny_model, "name": "b", "idle_timeout": 300, "start_backoff": 0.5,
                    "start_backoff_max": 1},
                   {"path": tiny_model, "name": "e", "idle_timeout": 300, "start_backoff": 0.5,
                    "start_backoff_max": 1, "embedding": {}}],
    }
    gw = Gateway(config, str(tmp_path), api_key=ADMIN, env={"TMPDIR": str(tmp_path)})
    seen: set[int] = set()
    stored = Stored()
    try:
        rss_before = rss(gw.proc.pid)
        t0 = time.monotonic()
        outcomes = asyncio.run(_workload(gw, seen, stored))
        took = time.monotonic() - t0
        rss_after = rss(gw.proc.pid)
        print(f"\nsoak: {REQUESTS} requests in {took:.1f} s: {dict(sorted(outcomes.items()))}; gateway RSS "
              f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB; stored {sum(map(len, stored.ids.values()))}")
        # every request was answered (or abandoned by its client), and counted once at the gateway
        assert sum(outcomes.values()) == REQUESTS
        assert outcomes["abandoned"] > 200 and outcomes["200"] > 1000 and outcomes["400"] > 200
        assert sum(map(len, stored.ids.values())) > 300 and outcomes["404"] > 20  # stored, and refused across
        _check_tenants(gw, stored)
        assert rss_after - rss_before < RSS_GROWTH, (rss_before, rss_after)
        assert sum(gw.metric("zerostart_worker_crashes_total", model=m) for m in "abe") >= 3  # the killer did kill
        gw.wait_for("nothing in flight or queued", lambda: all(
            m["in_flight"] == 0 and m["queued"] == 0 for m in gw.status()["models"]), timeout=30)
        counted: Counter[str] = Counter()
        for (name, labels), v in gw.metrics().items():
            if name == "zerostart_requests_total":
                counted[dict(labels)["status"]] += int(v)
        print(f"counted at the gateway: {dict(sorted(counted.items()))}")
        assert sum(counted.values()) == REQUESTS
        # each answered request with the status its client saw; the abandoned ones each once, as
        # 499 or as the status of an answer that ended before the client left; a failed Responses
        # stream under the status of what failed it
        extra = {s: counted[s] - outcomes[s] for s in counted if s != "abandoned"}
        assert all(v >= 0 for v in extra.values()) and sum(extra.values()) == outcomes["abandoned"] + outcomes[FAILED], \
            extra
        assert not {s for s, v in extra.items() if v} - {"499", "200", "502", "stream_error", "503", "504", "429"}
        standby = gw.status()["standby"]
        if standby["pid"]:
            seen.add(standby["pid"])
        for m in gw.status()["models"]:
            assert m["oldest_in_flight_s"] == 0.0
            for w in m["workers"]:
                seen.add(w["pid"])
                if w["state"] == "hot":  # and nothing left in the worker's engine either
                    with worker_client(w["address"], worker_token(w["pid"])) as c:
                        h = c.get("/health").json()
                    assert h["in_flight"] == h["running"] == h["waiting"] == 0, (m["name"], h)
    finally:
        gw.stop()
    assert gw.proc.returncode in (0, -signal.SIGTERM)
    assert not [p for p in seen if pid_alive(p)]
    assert _workers_with(f"TMPDIR={tmp_path}") == []  # nor any other worker (or spare) it started
    assert not [d for d in os.listdir(tmp_path) if d.startswith("zerostart-")]  # its socket directory is gone
    assert "Traceback" not in "".join(gw.log), gw.tail(60)


def _workers_with(env_entry: str) -> list[int]:
    """Live worker processes whose environment holds ``env_entry`` (as the gateway's children's does)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if b"zerostart.serve.worker" in cmdline and env_entry.encode() in environ and pid_alive(int(entry)):
            found.append(int(entry))
    return found
