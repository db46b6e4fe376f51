"""Drive a live zerostart server with a trace, through its public face only: the OpenAI
completions route, ``GET /metrics`` and ``GET /zerostart/status``.

Each request of the (derived, time-compressed) trace is sent at its arrival time as a
completion with about as many prompt tokens as the trace says and exactly its output tokens
(``ignore_eos``); the driver records what the server answered (status, the cold-start and
queue headers, the rung the request woke the model from) and scrapes ``/metrics`` every
``sample_s`` for the replicas in each state and the memory reserved per device.

    run = asyncio.run(drive("http://127.0.0.1:8000", trace, ["m0", "m1"]))
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from zerostart.names import Climb
from zerostart.sim._traces import Trace, TraceError

COLD_START_HEADER = "x-zerostart-cold-start-ms"
QUEUE_HEADER = "x-zerostart-queue-ms"
RUNG_HEADER = "x-zerostart-cold-start-rung"
_WORD = " the"  # one token in the BPE vocabularies of the demo and SmolLM2 tokenizers (usage says the real count)


@dataclass
class Sent:
    """One request of the replay and what came back. Times are seconds from the replay's start."""

    index: int  # the request's index in the trace
    model: str  # the served model it went to
    at: float  # when the trace says it arrives
    prompt_tokens: int  # asked for (the trace's count, bounded)
    max_tokens: int
    sent: float = 0.0
    done: float = 0.0
    status: int = 0  # HTTP status; 0: no response (the error says why)
    cold_start_s: float | None = None  # the server's cold-start header
    queue_s: float | None = None  # the server's queue header
    rung: Climb | None = None  # where this request's cold start climbed from, if the server says
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Sample:
    """One scrape of ``/metrics``: replicas by state (all models) and bytes reserved per device."""

    t: float
    replicas: dict[str, float]
    reserved: dict[str, float]
    queued: float
    in_flight: float


@dataclass
class LiveRun:
    """Everything a replay observed; ``sim._compare`` turns it into the measured columns."""

    url: str
    started_unix: float
    requests: list[Sent]
    samples: list[Sample]
    cold_starts: dict[Climb, float]  # counter increase during the run, by the server's rung label
    climbs_ahead: dict[Climb, float]  # those of them begun with no request waiting (pre-warms), by rung label
    cold_start_seconds: dict[Climb, dict[str, float]]  # by rung label: {"sum": s, "count": n} increase
    status_before: dict[str, Any]
    status_after: dict[str, Any]
    lateness_s: float  # the largest delay of a send past its arrival time (the driver keeping up)


def served_models(url: str, trace: Trace, api_key: str | None = None) -> list[str]:
    """The served model each of the trace's models goes to: the i-th of ``GET /v1/models``."""
    r = httpx.get(f"{url}/v1/models", headers=_auth(api_key), timeout=30)
    r.raise_for_status()
    names = [m["id"] for m in r.json()["data"]]
    if len(trace.model_names) > len(names):
        raise TraceError(f"the trace has {len(trace.model_names)} models but {url} serves {len(names)} "
                         f"({', '.join(names)}); pass --models {len(names)} or fewer, or serve more models")
    return names[: len(trace.model_names)]


async def drive(url: str, trace: Trace, served: list[str], *, api_key: str | None = None, sample_s: float = 0.5,
                request_timeout_s: float = 900.0, log: Any = None) -> LiveRun:
    """Send every request of ``trace`` at its time (seconds from now), to ``served[model]``; wait
    for every answer; scrape the metrics throughout."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, headers=_auth(api_key), limits=limits,
                                 timeout=httpx.Timeout(request_timeout_s, connect=30.0)) as client:
        status_before = (await client.get("/zerostart/status")).json()
        before = _counters(await _scrape(client))
        t0 = time.monotonic()
        started_unix = time.time()
        samples: list[Sample] = []
        done = asyncio.Event()
        sampler = asyncio.create_task(_sample(client, t0, sample_s, samples, done))
        requests = _plan(trace, served)
        lateness = 0.0
        tasks = []
        for k, req in enumerate(requests):
            delay = req.at - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            lateness = max(lateness, time.monotonic() - t0 - req.at)
            tasks.append(asyncio.create_task(_send(client, req, t0)))
            if log is not None and k % 200 == 199:
                log(f"  {k + 1:,}/{len(requests):,} requests sent at {time.monotonic() - t0:.0f} s")
        await asyncio.gather(*tasks)
        done.set()
        await sampler
        samples.append(await _sample_once(client, t0))
        after = _counters(await _scrape(client))
        status_after = (await client.get("/zerostart/status")).json()
    return LiveRun(url=url, started_unix=started_unix, requests=requests, samples=samples,
                   cold_starts=_diff(before[0], after[0]), climbs_ahead=_diff(before[3], after[3]),
                   cold_start_seconds={k: {"sum": after[1].get(k, 0.0) - before[1].get(k, 0.0),
                                           "count": after[2].get(k, 0.0) - before[2].get(k, 0.0)}
                                       for k in after[2]},
                   status_before=status_before, status_after=status_after, lateness_s=lateness)


def _plan(trace: Trace, served: list[str]) -> list[Sent]:
    times = trace.times.tolist()
    models = trace.models.tolist()
    tin = trace.input_tokens.tolist() if trace.input_tokens is not None else [16] * len(times)
    tout = trace.output_tokens.tolist() if trace.output_tokens is not None else [16] * len(times)
    return [Sent(index=i, model=served[models[i]], at=times[i], prompt_tokens=max(1, int(tin[i])),
                 max_tokens=max(1, int(tout[i]))) for i in range(len(times))]


async def _send(client: httpx.AsyncClient, req: Sent, t0: float) -> None:
    body = {"model": req.model, "prompt": _WORD * req.prompt_tokens, "max_tokens": req.max_tokens,
            "temperature": 0, "ignore_eos": True}
    req.sent = time.monotonic() - t0
    try:
        r = await client.post("/v1/completions", json=body)
    except httpx.HTTPError as e:
        req.done = time.monotonic() - t0
        req.error = f"{type(e).__name__}: {e}"
        return
    req.done = time.monotonic() - t0
    req.status = r.status_code
    req.cold_start_s = _header_s(r.headers.get(COLD_START_HEADER))
    req.queue_s = _header_s(r.headers.get(QUEUE_HEADER))
    climb = r.headers.get(RUNG_HEADER)
    req.rung = Climb(climb) if climb is not None else None
    try:
        payload = r.json()
    except ValueError:
        payload = {}
    if r.status_code == 200:
        usage = payload.get("usage") or {}
        req.usage = {k: int(v) for k, v in usage.items() if isinstance(v, int)}
    else:
        err = payload.get("error") if isinstance(payload, dict) else None
        req.error = str(err.get("message") if isinstance(err, dict) else r.text[:300])


def _header_s(value: str | None) -> float | None:
    try:
        return float(value) / 1000.0 if value is not None else None
    except ValueError:
        return None  # "pending" on a held stream; not sent here


async def _sample(client: httpx.AsyncClient, t0: float, every: float, out: list[Sample], done: asyncio.Event) -> None:
    while not done.is_set():
        began = time.monotonic()
        try:
            out.append(await _sample_once(client, t0))
        except httpx.HTTPError:
            pass  # a scrape that failed leaves a longer interval; the next one resumes the series
        try:
            await asyncio.wait_for(done.wait(), max(0.0, every - (time.monotonic() - began)))
        except TimeoutError:
            pass


async def _sample_once(client: httpx.AsyncClient, t0: float) -> Sample:
    families = await _scrape(client)
    t = time.monotonic() - t0
    replicas: dict[str, float] = {}
    reserved: dict[str, float] = {}
    queued = in_flight = 0.0
    for name, labels, value in families:
        if name == "zerostart_replicas":
            replicas[labels["state"]] = replicas.get(labels["state"], 0.0) + value
        elif name == "zerostart_memory_reserved_bytes":
            reserved[labels["device"]] = value
        elif name == "zerostart_queue_length":
            queued += value
        elif name == "zerostart_in_flight":
            in_flight += value
    return Sample(t, replicas, reserved, queued, in_flight)


async def _scrape(client: httpx.AsyncClient) -> list[tuple[str, dict[str, str], float]]:
    r = await client.get("/metrics", timeout=30.0)
    r.raise_for_status()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def _counters(samples: list[tuple[str, dict[str, str], float]]) -> tuple[dict[Climb, float], ...]:
    """Cold starts, the cold-start histogram's sum and count, and the climbs begun ahead of
    requests, by rung label."""
    starts: dict[Climb, float] = {}
    sums: dict[Climb, float] = {}
    counts: dict[Climb, float] = {}
    ahead: dict[Climb, float] = {}
    for name, labels, value in samples:
        target = {"zerostart_cold_starts_total": starts, "zerostart_cold_start_seconds_sum": sums,
                  "zerostart_cold_start_seconds_count": counts, "zerostart_climbs_ahead_total": ahead}.get(name)
        if target is not None:
            climb = Climb(labels["rung"])
            target[climb] = target.get(climb, 0.0) + value
    return starts, sums, counts, ahead


def _diff(before: dict[Climb, float], after: dict[Climb, float]) -> dict[Climb, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def _auth(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}
