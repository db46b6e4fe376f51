"""The shape of ``GET /zerostart/status``: one typed model that the gateway writes
(``Fleet.status``) and ``zerostart status``, the dashboard's test and other clients read.

The gateway validates what it writes strictly (a field it sends must be declared here);
:func:`parse_status` reads leniently (fields a newer gateway added are ignored), so an older
client still reads a newer server. Sizes are bytes, times seconds; ``None`` means "not known"
(a model whose size no replica has measured yet) or "never" (a keep-alive without end).

A model's ``rung`` is where it rests on the cold ladder now (a ``zerostart.names.Rung``); a
cold start's and a worker's ``rung`` is where it climbed from (a ``zerostart.names.Climb``)::

    hot     a replica holds it in device memory (or is climbing to, or serving)
    parked  a worker is alive with its weights in host RAM
    image   no worker; a ready image on local disk restores it
    zero    no worker and no image: the next start loads the source
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from zerostart.names import Climb, Rung
from zerostart.serve.control import KVCapacity

__all__ = ["ColdStart", "DeviceStatus", "FleetStatus", "ModelStatus", "Phase", "RecentColdStart", "StandbyStatus",
           "WorkerStatus", "model_rung", "parse_status"]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the gateway's side; parse_status overrides it per call


class Phase(_Shape):
    """One phase of a cold start, seconds from its beginning (``telemetry.Phase.to_dict``)."""

    name: str
    start_s: float
    end_s: float
    seconds: float
    bytes: int = 0
    gbps: float | None = None
    detail: dict[str, Any] = {}

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # as telemetry writes a phase: bytes, gbps and detail only where there are some
        return {k: v for k, v in handler(self).items() if v or k not in ("bytes", "gbps", "detail")}


class ColdStart(_Shape):
    """A model's latest climb: from which rung, how long until ready, and its phases."""

    rung: Climb  # climbed from: source, image, standby+source, standby+image, parked
    ready_s: float  # the climb until the replica was ready
    total_s: float  # the timeline's extent (the first token included once one was served)
    phases: list[Phase]
    image: dict[str, Any] | None = None  # what the worker did with ready images (control.ImageReport)
    standby: dict[str, Any] | None = None  # a standby worker's own start, paid before this one

    def slowest(self) -> Phase | None:
        """The phase that took longest (the one to look at first)."""
        return max(self.phases, key=lambda p: p.seconds, default=None)


class RecentColdStart(ColdStart):
    """One of the fleet's latest cold starts (newest first in :class:`FleetStatus`)."""

    model: str
    at_unix: float  # when it became ready
    ahead: bool  # begun with no request waiting (a pre-warm or a floor)


class WorkerStatus(_Shape):
    pid: int | None
    state: str  # the replica's lifecycle state (gateway/_state.py)
    rung: Climb  # where it last climbed from
    address: str | None
    in_flight: int
    oldest_in_flight_s: float
    idle_s: float
    kept_for_s: float | None  # until its keep-alive ends (None: forever)
    memory_bytes: int  # device bytes the budget holds for it now
    # its engine's own counters as last read (llama.cpp's /metrics, vLLM's names where they count
    # the same thing); absent for an engine that reports none
    engine_metrics: dict[str, float] | None = None
    kv: KVCapacity | None = None  # what its engine's KV cache holds (None: its backend does not say)

    @model_serializer(mode="wrap")
    def _compact(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k != "engine_metrics"}


class ModelStatus(_Shape):
    name: str
    state: str  # the state of its most capable replica (gateway/_state.py)
    rung: Rung  # where it rests on the ladder now
    replicas: int
    queued: int  # requests held waiting for a replica
    in_flight: int
    device: str
    backend: str
    memory_bytes: int  # device bytes its replicas hold now
    memory_estimate_bytes: int | None  # what one replica holds
    memory_estimate_source: str | None  # config, headers, share or measured
    memory_share_bytes: int | None
    unavailable_rungs: dict[Rung, str]  # rung -> why the model cannot rest there
    keep_alive_policy: str = ""  # the policy that decides (without keep_alive_policy: ttl:<idle_timeout>,...)
    keep_alive_s: float | None
    park_after_s: float | None
    parkable: bool
    images: str
    last_cold_start: ColdStart | None
    restart_s: float | None  # what a start from its lowest rung is expected to take
    last_error: str | None
    backoff_s: float
    oldest_in_flight_s: float
    requests: int  # requests answered since the gateway started (every status)
    cold_starts: int  # cold starts that reached ready since the gateway started
    workers: list[WorkerStatus]


class DeviceStatus(_Shape):
    device: str
    budget_bytes: int | None
    reserved_bytes: int  # held by replicas: hot_bytes + parked_bytes + what climbing ones reserved
    hot_bytes: int  # held by replicas serving or ready to
    parked_bytes: int  # still held by parked replicas (on CPU their weights stay in host RAM)


class StandbyStatus(_Shape):
    state: str  # ready, preparing or none
    device: str
    pid: int | None
    reserve_bytes: int


class FleetStatus(_Shape):
    version: str
    uptime_s: float
    models: list[ModelStatus]
    devices: list[DeviceStatus]
    standby: StandbyStatus | None
    recent_cold_starts: list[RecentColdStart]  # newest first


def model_rung(m: ModelStatus) -> Rung:
    """Where ``m`` rests on the cold ladder."""
    return m.rung


def parse_status(data: Any) -> FleetStatus:
    """A status body as a :class:`FleetStatus`; fields this version does not know are ignored.
    Raises ``pydantic.ValidationError`` for a body of another shape."""
    return FleetStatus.model_validate(data, extra="ignore")
