"""Prometheus metrics of one gateway (text format at ``GET /metrics``).

Counters and histograms are updated as things happen; gauges (queue length, replica states,
memory) are read from the fleet at scrape time, so they are never stale. Beside zerostart's own
(cold starts, the ladder), the serving metrics have vLLM's names, labels and buckets
(``vllm:prompt_tokens_total{model_name}``, ...), so vLLM's dashboards and autoscaling rules
read a zerostart gateway as they read vLLM; they come from each worker's
``control.RequestStats`` and live in the gateway, so scaling to zero loses none of them.
The latest cold starts, phase by phase, are kept too (:meth:`Metrics.recent`) for the status
route and the dashboard.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from zerostart.names import LADDER, Climb, Rung
from zerostart.serve.control import ITL_BUCKETS, RequestStats
from zerostart.serve.gateway._state import State
from zerostart.telemetry import Timeline

# Cold starts and their phases span milliseconds (a warm page cache) to minutes (remote fetch).
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# vLLM's buckets for time to first token, and for end-to-end and queue times
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)
_VLLM = ["model_name"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT_COLD_STARTS = 20  # the latest cold starts the status route lists


@dataclass(frozen=True)
class ModelGauges:
    name: str
    state: State
    replicas: dict[State, int]
    queued: int
    in_flight: int
    in_flight_by_replica: dict[str, int]  # the worker's pid -> requests it serves
    oldest_in_flight_s: float  # how long the oldest request in flight has been served (0: none)
    rung: Rung = Rung.ZERO  # where it rests on the cold ladder
    device: str = "cpu"
    memory_bytes: int = 0  # device bytes its replicas hold


@dataclass(frozen=True)
class ColdStartRecord:
    """One cold start that reached ready. ``timeline`` is the replica's own: a first token
    served later still lands on it."""

    model: str
    climb: Climb
    timeline: Timeline
    ready_s: float
    ahead: bool
    at_unix: float


@dataclass(frozen=True)
class DeviceGauges:
    device: str
    reserved_bytes: int
    budget_bytes: int | None


class Metrics:
    def __init__(self, models: Iterable[str], models_now: Callable[[], list[ModelGauges]],
                 devices_now: Callable[[], list[DeviceGauges]], standby_now: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("zerostart_requests", "Requests, each counted once when it is over, by model and HTTP "
                                "status (stream_error: a stream begun with 200 that ended in an error event; 499: "
                                "the client left before its answer ended)", ["model", "status"], registry=r)
        self.cold_starts = Counter("zerostart_cold_starts", "Cold starts that reached ready, by the rung climbed from "
                                   f"({', '.join(Climb)})", ["model", "rung"], registry=r)
        self.climbs_ahead = Counter("zerostart_climbs_ahead", "Cold starts begun with no request waiting (a "
                                    "policy's pre-warm, a floor), also counted in zerostart_cold_starts",
                                    ["model", "rung"], registry=r)
        self.parks = Counter("zerostart_parks", "Replicas parked (weights moved to host RAM), by reason (idle, evicted)",
                             ["model", "reason"], registry=r)
        self.start_failures = Counter("zerostart_start_failures", "Starts that failed, by cause",
                                      ["model", "cause"], registry=r)
        self.image_writes = Counter("zerostart_image_writes", "Ready images written in the background after a start, "
                                    "by how the write ended (written, write_failed)", ["model", "status"], registry=r)
        self.worker_crashes = Counter("zerostart_worker_crashes", "Hot workers that exited unasked", ["model"], registry=r)
        self.stops = Counter("zerostart_replica_stops", "Replicas stopped, by reason (idle, evicted, shutdown, "
                             "park_failed, wake_failed, replaced: killed as hung or in a state the gateway did not cause)",
                             ["model", "reason"], registry=r)
        self.cold_start_seconds = Histogram("zerostart_cold_start_seconds", "Cold start from spawn to ready",
                                            ["model", "rung"], buckets=_SECONDS_BUCKETS, registry=r)
        self.cold_start_phase = Histogram("zerostart_cold_start_phase_seconds", "Cold-start duration per phase",
                                          ["model", "rung", "phase"], buckets=_SECONDS_BUCKETS, registry=r)
        self.ttft = Histogram("zerostart_time_to_first_token_seconds", "Streamed requests: arrival at the gateway "
                              "to the first token, cold starts included", ["model"], buckets=_SECONDS_BUCKETS, registry=r)
        self.request_seconds = Histogram("zerostart_request_duration_seconds", "Arrival to the last byte sent",
                                         ["model"], buckets=_SECONDS_BUCKETS, registry=r)
        # vLLM's serving metrics (docs/serve.md says which concept each one measures here)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", _VLLM, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", _VLLM, registry=r)
        self.request_success = Counter("vllm:request_success", "Sequences finished, by the engine's finish reason "
                                       "(stop, length, abort)", _VLLM + ["finished_reason"], registry=r)
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival at the gateway to the first generated "
                                   "token (waiting for a replica included)", _VLLM, buckets=_TTFT_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Arrival to the first prefill: the wait for a "
                                    "replica (cold start included) and for a KV cache slot", _VLLM,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival at the gateway to the last byte sent",
                             _VLLM, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = _Buckets("vllm:inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                            ITL_BUCKETS)
        r.register(self.itl)
        for name in models:  # counters that tests and dashboards read exist from the start, at 0
            self.cold_starts.labels(name, Climb.SOURCE.value)
            self.prompt_tokens.labels(name)
            self.generation_tokens.labels(name)
        self.recent: deque[ColdStartRecord] = deque(maxlen=RECENT_COLD_STARTS)  # newest first
        r.register(_FleetCollector(models_now, devices_now, standby_now))
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux)

    def observe_request(self, model: str, stats: RequestStats, waited_s: float, e2e_s: float) -> None:
        """A request a replica answered, with what it cost the engine; ``waited_s``: its wait
        at the gateway for a replica (a cold start, room on a busy one); ``e2e_s``: arrival to
        the last byte."""
        self.e2e.labels(model).observe(e2e_s)
        self.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        self.generation_tokens.labels(model).inc(stats.generation_tokens)
        for reason, n in stats.finished.items():
            self.request_success.labels(model, reason).inc(n)
        self.queue_time.labels(model).observe(waited_s + stats.queue_s)
        if stats.first_token_s is not None:
            self.vllm_ttft.labels(model).observe(waited_s + stats.first_token_s)
        self.itl.add(model, stats.itl_counts, stats.itl_sum)

    def observe_cold_start(self, model: str, climb: Climb, timeline: Timeline, ready_s: float, *, ahead: bool) -> None:
        self.recent.appendleft(ColdStartRecord(model, climb, timeline, ready_s, ahead, time.time()))
        rung = climb.value  # the label: where it climbed from
        self.cold_starts.labels(model, rung).inc()
        if ahead:
            self.climbs_ahead.labels(model, rung).inc()
        self.cold_start_seconds.labels(model, rung).observe(ready_s)
        for p in timeline.phases:
            self.cold_start_phase.labels(model, rung, p.name).observe(p.seconds)

    def observe_first_token(self, model: str, climb: Climb, seconds: float) -> None:
        self.cold_start_phase.labels(model, climb.value, "first_token").observe(seconds)

    def totals(self) -> dict[str, tuple[int, int]]:
        """Per model: requests counted (every status) and cold starts that reached ready, since
        the gateway started (what the dashboard's rates are differences of)."""
        out: dict[str, list[int]] = {}
        for i, counter in enumerate((self.requests, self.cold_starts)):
            for family in counter.collect():
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        out.setdefault(sample.labels["model"], [0, 0])[i] += int(sample.value)
        return {model: (n[0], n[1]) for model, n in out.items()}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Buckets(Collector):
    """A histogram per model whose observations arrive already bucketed (a worker's
    ``itl_counts``: one count per bucket, +Inf last), rendered as Prometheus's cumulative buckets."""

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def add(self, model: str, counts: list[int], total: float) -> None:
        if len(counts) != len(self.bounds) + 1:
            return  # a worker of another version, with other buckets: not comparable
        mine = self._counts.setdefault(model, [0] * len(counts))
        for i, n in enumerate(counts):
            mine[i] += n
        self._sums[model] = self._sums.get(model, 0.0) + total

    def collect(self):
        fam = HistogramMetricFamily(self.name, self.doc, labels=_VLLM)
        for model, counts in self._counts.items():
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, self.bounds), "+Inf"], counts):
                cumulative += n
                buckets.append((bound, cumulative))
            fam.add_metric([model], buckets, self._sums[model])
        yield fam


class _FleetCollector(Collector):
    def __init__(self, models_now: Callable[[], list[ModelGauges]], devices_now: Callable[[], list[DeviceGauges]],
                 standby_now: Callable[[], int]):
        self._models_now = models_now
        self._devices_now = devices_now
        self._standby_now = standby_now

    def collect(self):
        queue = GaugeMetricFamily("zerostart_queue_length", "Requests held waiting for a replica", labels=["model"])
        in_flight = GaugeMetricFamily("zerostart_in_flight", "Requests being served by workers", labels=["model"])
        per_replica = GaugeMetricFamily("zerostart_replica_in_flight", "Requests being served, per worker (its pid)",
                                        labels=["model", "pid"])
        oldest = GaugeMetricFamily("zerostart_oldest_in_flight_seconds", "How long the oldest request in flight has "
                                   "been served (a request that never ends shows here)", labels=["model"])
        replicas = GaugeMetricFamily("zerostart_replicas", "Replicas by state", labels=["model", "state"])
        state = GaugeMetricFamily("zerostart_model_state", "1 for the state each model is in", labels=["model", "state"])
        rung = GaugeMetricFamily("zerostart_model_rung", "1 for the rung of the cold ladder each model rests on "
                                 f"({', '.join(LADDER)})", labels=["model", "rung"])
        memory = GaugeMetricFamily("zerostart_model_memory_bytes", "Device bytes each model's replicas hold",
                                   labels=["model", "device"])
        models = self._models_now()
        for m in models:
            queue.add_metric([m.name], m.queued)
            in_flight.add_metric([m.name], m.in_flight)
            for pid, n in m.in_flight_by_replica.items():
                per_replica.add_metric([m.name, pid], n)
            oldest.add_metric([m.name], m.oldest_in_flight_s)
            for s in State:
                if s is not State.ZERO:
                    replicas.add_metric([m.name, s.value], m.replicas.get(s, 0))
                state.add_metric([m.name, s.value], 1.0 if s is m.state else 0.0)
            for r in LADDER:
                rung.add_metric([m.name, r.value], 1.0 if r is m.rung else 0.0)
            memory.add_metric([m.name, m.device], m.memory_bytes)
        reserved = GaugeMetricFamily("zerostart_memory_reserved_bytes", "Estimated device bytes held by replicas",
                                     labels=["device"])
        budget = GaugeMetricFamily("zerostart_memory_budget_bytes", "Configured device memory budgets", labels=["device"])
        for d in self._devices_now():
            reserved.add_metric([d.device], d.reserved_bytes)
            if d.budget_bytes is not None:
                budget.add_metric([d.device], d.budget_bytes)
        standby = GaugeMetricFamily("zerostart_standby_workers_ready", "Standby workers ready to take a model")
        standby.add_metric([], self._standby_now())
        yield from (queue, in_flight, per_replica, oldest, replicas, state, rung, memory, reserved, budget, standby)
        # vLLM's names for the same two numbers (KEDA/HPA rules scale on num_requests_waiting)
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests being served by replicas", labels=_VLLM)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for a replica (cold or busy)",
                                    labels=_VLLM)
        for m in models:
            running.add_metric([m.name], m.in_flight)
            waiting.add_metric([m.name], m.queued)
        yield from (running, waiting)
