"""Prometheus metrics of one gateway (text format at ``GET /metrics``).

Counters and histograms are updated as things happen; gauges (queue length, replica states,
memory) are read from the fleet at scrape time, so they are never stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from zerostart.serve.gateway._state import State
from zerostart.telemetry import Timeline

# Cold starts and their phases span milliseconds (a warm page cache) to minutes (remote fetch).
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class ModelGauges:
    name: str
    state: State
    replicas: dict[State, int]
    queued: int
    in_flight: int
    in_flight_by_replica: dict[str, int]  # the worker's pid -> requests it serves
    oldest_in_flight_s: float  # how long the oldest request in flight has been served (0: none)


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
                                   "(source, image, standby+source, standby+image, parked)", ["model", "rung"], registry=r)
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
        for name in models:  # counters that tests and dashboards read exist from the start, at 0
            self.cold_starts.labels(name, "source")
        r.register(_FleetCollector(models_now, devices_now, standby_now))

    def observe_cold_start(self, model: str, rung: str, timeline: Timeline, ready_s: float, *, ahead: bool) -> None:
        self.cold_starts.labels(model, rung).inc()
        if ahead:
            self.climbs_ahead.labels(model, rung).inc()
        self.cold_start_seconds.labels(model, rung).observe(ready_s)
        for p in timeline.phases:
            self.cold_start_phase.labels(model, rung, p.name).observe(p.seconds)

    def observe_first_token(self, model: str, rung: str, seconds: float) -> None:
        self.cold_start_phase.labels(model, rung, "first_token").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
        for m in self._models_now():
            queue.add_metric([m.name], m.queued)
            in_flight.add_metric([m.name], m.in_flight)
            for pid, n in m.in_flight_by_replica.items():
                per_replica.add_metric([m.name, pid], n)
            oldest.add_metric([m.name], m.oldest_in_flight_s)
            for s in State:
                if s is not State.ZERO:
                    replicas.add_metric([m.name, s.value], m.replicas.get(s, 0))
                state.add_metric([m.name, s.value], 1.0 if s is m.state else 0.0)
        reserved = GaugeMetricFamily("zerostart_memory_reserved_bytes", "Estimated device bytes held by replicas",
                                     labels=["device"])
        budget = GaugeMetricFamily("zerostart_memory_budget_bytes", "Configured device memory budgets", labels=["device"])
        for d in self._devices_now():
            reserved.add_metric([d.device], d.reserved_bytes)
            if d.budget_bytes is not None:
                budget.add_metric([d.device], d.budget_bytes)
        standby = GaugeMetricFamily("zerostart_standby_workers_ready", "Standby workers ready to take a model")
        standby.add_metric([], self._standby_now())
        yield from (queue, in_flight, per_replica, oldest, replicas, state, reserved, budget, standby)
