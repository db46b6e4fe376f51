"""Replay a trace against one policy: a discrete-event simulation of the server's fleet
(``_fleet.py`` says what it models), and the metrics of the run.

Start: every model is idle at the first request's time, placed at no cost on the rung the
policy picks for a model that has just gone idle there (HOT, except for a zero timeout); or,
``Start(fresh=True)``, on ZERO like the models of a server that has just started.
Costs: HOT time (climbs included: the device is held while loading) x device price x share;
PARKED time x (model + worker RAM) x RAM price; a model's ready image is charged on disk for
the whole run once the policy has rested it on IMAGE.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from zerostart.policy import LADDER, CostModel, Policy, Rung
from zerostart.sim._fleet import Room, SimFleet
from zerostart.units import GB, HOURS_PER_MONTH
from zerostart.sim._traces import Trace, TraceError


@dataclass(frozen=True)
class Capacity:
    """What fits on the simulated node (None: unlimited). ``hot``/``parked``: models HOT / PARKED
    at once (a GPU node: its devices, and the host RAM parked weights go to). ``memory_gb``: one
    memory budget HOT and PARKED models share, as on a CPU server whose parked weights stay in
    the host RAM that is its device memory; a HOT model holds its weights and ``kv_gb`` of KV
    cache, a PARKED one its weights."""

    hot: int | None = None
    parked: int | None = None
    memory_gb: float | None = None
    kv_gb: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Capacity":
        """``hot=8,parked=32``, ``memory_gb=1.2,kv_gb=0.04`` (any may be left out) or ``unlimited``."""
        t = "".join(text.split()).lower()
        if t in ("", "unlimited"):
            return cls()
        values: dict[str, float] = {}
        for part in t.split(","):
            key, eq, value = part.partition("=")
            if not eq or key not in ("hot", "parked", "memory_gb", "kv_gb"):
                raise TraceError(f"bad --capacity {text!r}: expected hot=N,parked=M or memory_gb=G,kv_gb=G "
                                 "(each optional)")
            try:
                n = int(value) if key in ("hot", "parked") else float(value)
            except ValueError:
                kind = "an integer" if key in ("hot", "parked") else "a number of GB"
                raise TraceError(f"bad --capacity {text!r}: {key} must be {kind}, got {value!r}") from None
            if not math.isfinite(n) or (n <= 0 if key == "memory_gb" else n < (1 if key == "hot" else 0)):
                raise TraceError(f"bad --capacity {text!r}: need hot >= 1, parked >= 0, memory_gb > 0, kv_gb >= 0")
            values[key] = n
        return cls(**values)  # type: ignore[arg-type]

    def describe(self) -> str:
        def one(n: int | None) -> str:
            return "unlimited" if n is None else str(n)

        text = f"hot {one(self.hot)}, parked {one(self.parked)}"
        if self.memory_gb is not None:
            text += f", memory {self.memory_gb:g} GB shared by hot and parked models (KV cache {self.kv_gb:g} GB)"
        return text

    def room(self, costs: CostModel, size_bytes: int) -> Room:
        """The simulated fleet's room for models of ``size_bytes`` (0: the cost model's size)."""
        weights = int(costs.size_gb(size_bytes) * GB)
        budget = None if self.memory_gb is None else int(self.memory_gb * GB)
        return Room(self.hot, self.parked, budget, weights + int(self.kv_gb * GB), weights)


@dataclass(frozen=True)
class Service:
    """How long a request keeps its model busy: ``overhead_s`` + prompt / prefill rate + output
    / decode rate, or ``fixed_s`` for a trace without token counts."""

    prefill_tps: float = 10_000.0
    decode_tps: float = 50.0
    fixed_s: float = 1.0
    overhead_s: float = 0.0  # per request besides its tokens (HTTP, scheduling, the first step)

    def durations(self, trace: Trace) -> np.ndarray:
        n = len(trace)
        if trace.input_tokens is None and trace.output_tokens is None:
            return np.full(n, self.fixed_s)
        d = np.full(n, self.overhead_s)
        if trace.input_tokens is not None:
            d += trace.input_tokens / self.prefill_tps
        if trace.output_tokens is not None:
            d += trace.output_tokens / self.decode_tps
        return d

    def describe(self) -> str:
        overhead = f"{self.overhead_s:.3g} s + " if self.overhead_s else ""
        return (f"service time = {overhead}prompt/{self.prefill_tps:.4g} + output/{self.decode_tps:.4g} tokens/s "
                f"(or {self.fixed_s:g} s without token counts)")


@dataclass(frozen=True)
class Start:
    """Where the models are when the replay begins. ``fresh``: every model on ZERO, as on a
    server that has just started (else each rests where the policy puts a model that has just
    gone idle). ``keep_images``: a model once loaded keeps its ready image on disk, so it never
    rests below IMAGE (the server with ``images: write``)."""

    fresh: bool = False
    keep_images: bool = False


def replay(policy: Policy, trace: Trace, costs: CostModel, *, capacity: Capacity = Capacity(),
           service: Service = Service(), size_bytes: int = 0, start: Start = Start()) -> dict:
    """Replay ``trace`` against ``policy``; return the metrics as a dict (see ``_result``)."""
    if len(trace) == 0:
        raise TraceError("cannot replay an empty trace")
    wall0 = time.perf_counter()
    times = trace.times.tolist()
    models = trace.models.tolist()
    durations = service.durations(trace).tolist()
    wake = [{r: costs.wake_s(r, size_bytes, name) for r in LADDER} for name in trace.model_names]
    fleet = SimFleet(policy, trace.model_names, wake, capacity.room(costs, size_bytes), size_bytes, times, times[0],
                     keep_images=start.keep_images)
    fleet.open(times[0], fresh=start.fresh)
    for i, t in enumerate(times):
        fleet.run_until(t)  # what happens before this request: completions, rechecks, pre-warms
        fleet.arrive(i, models[i], t, durations[i])
    fleet.finish()
    return _result(policy, trace, costs, size_bytes, fleet, times[0], time.perf_counter() - wall0)


def _result(policy: Policy, trace: Trace, costs: CostModel, size_bytes: int, fleet: SimFleet, t0: float,
            wall: float) -> dict:
    n_models = len(trace.model_names)
    hold, cold, stats, lat = fleet.hold, fleet.cold, fleet.stats, fleet.latency
    gb = costs.size_gb(size_bytes)
    span = fleet.t_end - t0
    gpu_hours = hold[Rung.HOT] * costs.device_share / 3600.0
    ram_gb_hours = hold[Rung.PARKED] * (gb + costs.worker_ram_gb) / 3600.0
    disk_gb_months = sum(fleet.used_image) * gb * span / (HOURS_PER_MONTH * 3600.0)
    gpu_usd = gpu_hours * costs.device_usd_per_hour
    ram_usd = ram_gb_hours * costs.host_ram_usd_per_gb_hour
    disk_usd = disk_gb_months * costs.disk_usd_per_gb_month
    total = gpu_usd + ram_usd + disk_usd
    always = n_models * span * costs.hold_usd_per_s(Rung.HOT, size_bytes)
    a = np.asarray(lat)
    p50, p95, p99 = (float(x) for x in np.percentile(a, [50, 95, 99]))
    n = len(lat)
    return {
        "policy": policy.name,
        "requests": n,
        "models": n_models,
        "hours": span / 3600.0,
        "cold_starts": sum(cold[r] for r in LADDER[1:]),
        "cold_starts_by_rung": {r.value: cold[r] for r in LADDER[1:]},  # parked, image, zero
        "delayed_requests": int((a > 0).sum()),
        "prewarms": stats["prewarms"],
        "prewarm_hits": stats["prewarm_hits"],
        "prewarms_skipped": stats["prewarms_skipped"],
        "evictions": stats["evictions"],
        "queued_requests": stats["queued"],
        "p50_added_latency_s": p50,
        "p95_added_latency_s": p95,
        "p99_added_latency_s": p99,
        "max_added_latency_s": float(a.max()),
        "mean_added_latency_s": float(a.mean()),
        "rung_hours": {r.value: hold[r] / 3600.0 for r in LADDER},
        "gpu_hours": gpu_hours,
        "host_ram_gb_hours": ram_gb_hours,
        "memory_gb_hours": fleet.memory_gb_hours(),
        "disk_gb_months": disk_gb_months,
        "gpu_usd": gpu_usd,
        "host_ram_usd": ram_usd,
        "disk_usd": disk_usd,
        "total_cost_usd": total,
        "usd_per_1k_requests": total / n * 1000.0,
        "always_warm_cost_usd": always,
        "cost_vs_always_warm": total / always if always > 0 else math.nan,
        "latency_cost_usd": float(a.sum()) * costs.latency_usd_per_s,
        "replay_s": wall,
        "requests_per_min": n / wall * 60.0 if wall > 0 else math.inf,
    }


