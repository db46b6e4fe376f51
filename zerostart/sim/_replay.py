"""Replay a trace against one policy: a discrete-event simulation of a fleet on the ladder.

The simulated fleet follows the caller contract in ``zerostart.policy._base`` exactly:

* A request for a model below HOT climbs it (a cold start from that rung); requests arriving
  during a climb join it. The added latency of a request is the time from its arrival until
  its model is HOT (climb, plus any wait for a free device); the service time is not added.
* A model is busy while requests are in flight or a climb is under way; it never moves down
  while busy. When it goes idle the policy decides; rechecks and pre-warms are scheduled events.
* Capacity: at most ``hot`` models HOT (climbing counts) and ``parked`` PARKED at once. A climb
  that finds no free device evicts the least recently used idle HOT model (to the policy's first
  rung below HOT, PARKED if it has none); if every HOT model is busy, requests wait in arrival
  order. PARKED over capacity evicts the least recently parked model to IMAGE. A pre-warm never
  evicts a model for itself beyond an idle one and never jumps the queue: it is skipped.
* Costs: HOT time (climbs included: the device is held while loading) x device price x share;
  PARKED time x (model + worker RAM) x RAM price; a model's ready image is charged on disk for
  the whole run once the policy has rested it on IMAGE.
* Start: every model is idle at the first request's time, placed at no cost on the rung the
  policy picks for a model that has just gone idle there (HOT, except for a zero timeout).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from zerostart.policy import LADDER, CostModel, ModelView, Policy, Rung
from zerostart.units import HOURS_PER_MONTH
from zerostart.sim._traces import Trace, TraceError

_HOT, _PARKED, _IMAGE = 0, 1, 2
_COMPLETE, _CLIMBED, _PREWARM, _DECIDE = 0, 1, 2, 3


@dataclass(frozen=True)
class Capacity:
    """How many models fit HOT and PARKED at once (None: unlimited)."""

    hot: int | None = None
    parked: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Capacity":
        """``hot=8,parked=32`` (either may be left out: unlimited) or ``unlimited``."""
        t = "".join(text.split()).lower()
        if t in ("", "unlimited"):
            return cls()
        values: dict[str, int] = {}
        for part in t.split(","):
            key, eq, value = part.partition("=")
            if not eq or key not in ("hot", "parked"):
                raise TraceError(f"bad --capacity {text!r}: expected hot=N,parked=M (either optional)")
            try:
                n = int(value)
            except ValueError:
                raise TraceError(f"bad --capacity {text!r}: {key} must be an integer, got {value!r}") from None
            if n < (1 if key == "hot" else 0):
                raise TraceError(f"bad --capacity {text!r}: need hot >= 1 and parked >= 0")
            values[key] = n
        return cls(**values)

    def describe(self) -> str:
        def one(n: int | None) -> str:
            return "unlimited" if n is None else str(n)

        return f"hot {one(self.hot)}, parked {one(self.parked)}"


@dataclass(frozen=True)
class Service:
    """How long a request keeps its model busy: prompt / prefill rate + output / decode rate,
    or ``fixed_s`` for a trace without token counts."""

    prefill_tps: float = 10_000.0
    decode_tps: float = 50.0
    fixed_s: float = 1.0

    def durations(self, trace: Trace) -> np.ndarray:
        n = len(trace)
        if trace.input_tokens is None and trace.output_tokens is None:
            return np.full(n, self.fixed_s)
        d = np.zeros(n)
        if trace.input_tokens is not None:
            d += trace.input_tokens / self.prefill_tps
        if trace.output_tokens is not None:
            d += trace.output_tokens / self.decode_tps
        return d

    def describe(self) -> str:
        return (f"service time = prompt/{self.prefill_tps:g} + output/{self.decode_tps:g} tokens/s "
                f"(or {self.fixed_s:g} s without token counts)")


def replay(policy: Policy, trace: Trace, costs: CostModel, *, capacity: Capacity = Capacity(),
           service: Service = Service(), size_bytes: int = 0) -> dict:
    """Replay ``trace`` against ``policy``; return the metrics as a dict (see ``_result``)."""
    n_req = len(trace)
    if n_req == 0:
        raise TraceError("cannot replay an empty trace")
    wall0 = time.perf_counter()
    names = trace.model_names
    n_models = len(names)
    times = trace.times.tolist()
    mids = trace.models.tolist()
    dur = service.durations(trace).tolist()
    wake = [[costs.wake_s(r, size_bytes, name) for r in LADDER] for name in names]
    cap_hot = capacity.hot if capacity.hot is not None else n_models + 1
    cap_parked = capacity.parked if capacity.parked is not None else n_models + 1
    lower = [r.level for r in getattr(policy, "rungs", LADDER) if r is not Rung.HOT]
    evict_level = lower[0] if lower else _PARKED
    t0 = times[0]

    rung = [3] * n_models
    ready = [-math.inf] * n_models  # when the current climb completes
    inflight = [0] * n_models
    last = [t0] * n_models
    since = [t0] * n_models
    gen = [0] * n_models  # bumps invalidate scheduled decide/pre-warm events
    prewarmed = [False] * n_models
    used_image = [False] * n_models
    hold = [0.0, 0.0, 0.0, 0.0]  # model-seconds on each rung
    idle_hot: OrderedDict[int, None] = OrderedDict()  # HOT, idle, not climbing: LRU first
    parked_lru: OrderedDict[int, None] = OrderedDict()
    waiting: deque[int] = deque()
    waiting_set: set[int] = set()
    pending: list[list[int]] = [[] for _ in range(n_models)]
    lat = [0.0] * n_req
    cold = [0, 0, 0, 0]
    stats = {"prewarms": 0, "prewarm_hits": 0, "prewarms_skipped": 0, "evictions": 0, "queued": 0}
    counts = [0, 0]  # models HOT (climbing included), models PARKED
    heap: list[tuple] = []
    seq = 0
    t_end = times[-1]
    decide = policy.decide
    observe_arrival = policy.observe_arrival
    observe_completion = policy.observe_completion
    heappush, heappop = heapq.heappush, heapq.heappop

    def set_rung(m: int, new: int, now: float) -> None:
        old = rung[m]
        if old == new:
            return
        hold[old] += now - since[m]
        since[m] = now
        if old == _HOT:
            counts[0] -= 1
            idle_hot.pop(m, None)
            prewarmed[m] = False
        elif old == _PARKED:
            counts[1] -= 1
            parked_lru.pop(m, None)
        if new == _HOT:
            counts[0] += 1
        elif new == _PARKED:
            counts[1] += 1
            parked_lru[m] = None
        elif new == _IMAGE:
            used_image[m] = True
        rung[m] = new

    def move_down(m: int, target: int, now: float) -> None:
        """Lower ``m`` to ``target``; PARKED over capacity evicts the least recently parked."""
        if target == _PARKED and counts[1] >= cap_parked:
            if parked_lru:
                victim = next(iter(parked_lru))
                gen[victim] += 1
                set_rung(victim, _IMAGE, now)
                stats["evictions"] += 1
            else:  # no parking at all
                target = _IMAGE
        set_rung(m, target, now)

    def free_slot(now: float) -> bool:
        """Make room for one more HOT model by evicting the least recently used idle one."""
        if counts[0] < cap_hot:
            return True
        if not idle_hot:
            return False
        victim = next(iter(idle_hot))
        gen[victim] += 1
        stats["evictions"] += 1
        move_down(victim, evict_level, now)
        return True

    def climb(m: int, now: float) -> float:
        w = wake[m][rung[m]]
        set_rung(m, _HOT, now)
        ready[m] = now + w
        return w

    def serve_waiting(now: float) -> None:
        nonlocal seq, t_end
        while waiting and free_slot(now):
            m = waiting.popleft()
            waiting_set.discard(m)
            cold[rung[m]] += 1
            start = now + climb(m, now)
            for i in pending[m]:
                lat[i] = start - times[i]
                done = start + dur[i]
                if done > t_end:
                    t_end = done
                seq += 1
                heappush(heap, (done, seq, _COMPLETE, m, i))
            pending[m] = []

    def prewarm(m: int, now: float) -> bool:
        nonlocal seq
        if waiting or not free_slot(now):
            stats["prewarms_skipped"] += 1
            return False
        w = climb(m, now)
        stats["prewarms"] += 1
        prewarmed[m] = True
        gen[m] += 1
        seq += 1
        heappush(heap, (now + w, seq, _CLIMBED, m, gen[m]))  # decide again once HOT
        return True

    def apply_decision(m: int, now: float) -> None:
        nonlocal seq
        busy = inflight[m] > 0 or ready[m] > now
        d = decide(ModelView(names[m], LADDER[rung[m]], busy, last[m], size_bytes), now)
        gen[m] += 1
        target = d.rung.level
        cur = rung[m]
        pa, ra = d.prewarm_at, d.recheck_at
        if not busy:
            if target > cur:
                move_down(m, target, now)
                if cur == _HOT and waiting:
                    serve_waiting(now)
            elif target == _HOT and cur != _HOT:
                prewarm(m, now)
                return
            elif target < cur:  # up to PARKED/IMAGE ahead of traffic: no one waits on it
                set_rung(m, target, now)
            if pa is not None and pa <= now and rung[m] != _HOT:
                prewarm(m, now)
                return
        g = gen[m]
        if pa is not None and pa > now:
            seq += 1
            heappush(heap, (pa, seq, _PREWARM, m, g))
        if ra is not None and ra > now and ra != pa:
            seq += 1
            heappush(heap, (ra, seq, _DECIDE, m, g))

    def handle(ev: tuple) -> None:
        t, _, kind, m, aux = ev
        if kind == _COMPLETE:
            inflight[m] -= 1
            observe_completion(names[m], t)
            if inflight[m] == 0:
                last[m] = t
                if waiting:  # a device is wanted: this model is the idle one to give up
                    gen[m] += 1
                    stats["evictions"] += 1
                    move_down(m, evict_level, t)
                    serve_waiting(t)
                else:
                    idle_hot[m] = None
                    apply_decision(m, t)
            return
        if aux != gen[m]:
            return  # superseded
        if kind == _CLIMBED:
            if inflight[m] == 0:
                idle_hot[m] = None
                apply_decision(m, t)
        elif kind == _PREWARM:
            if rung[m] != _HOT:
                prewarm(m, t)
            else:
                apply_decision(m, t)
        else:
            apply_decision(m, t)

    # Start: every model idle at t0 on the policy's choice for a model just gone idle.
    for m in range(n_models):
        d = decide(ModelView(names[m], Rung.HOT, False, t0, size_bytes), t0)
        level = d.rung.level
        if level == _HOT and counts[0] >= cap_hot:
            level = evict_level
        if level == _PARKED and counts[1] >= cap_parked:
            level = _IMAGE
        set_rung(m, level, t0)
        if level == _HOT:
            idle_hot[m] = None
        gen[m] += 1
        if d.prewarm_at is not None and d.prewarm_at > t0:
            seq += 1
            heappush(heap, (d.prewarm_at, seq, _PREWARM, m, gen[m]))
        if d.recheck_at is not None and d.recheck_at > t0 and d.recheck_at != d.prewarm_at:
            seq += 1
            heappush(heap, (d.recheck_at, seq, _DECIDE, m, gen[m]))

    for i in range(n_req):
        t = times[i]
        while heap and heap[0][0] <= t:
            handle(heappop(heap))
        m = mids[i]
        observe_arrival(names[m], t)
        gen[m] += 1
        if m in waiting_set:
            inflight[m] += 1
            pending[m].append(i)
            continue
        if inflight[m] == 0:
            idle_hot.pop(m, None)
        level = rung[m]
        if level == _HOT:
            r = ready[m]
            start = r if r > t else t
            if prewarmed[m]:
                stats["prewarm_hits"] += 1
                prewarmed[m] = False
        elif not waiting and free_slot(t):
            cold[level] += 1
            start = t + climb(m, t)
        else:
            stats["queued"] += 1
            waiting.append(m)
            waiting_set.add(m)
            inflight[m] += 1
            pending[m].append(i)
            continue
        inflight[m] += 1
        lat[i] = start - t
        done = start + dur[i]
        if done > t_end:
            t_end = done
        seq += 1
        heappush(heap, (done, seq, _COMPLETE, m, i))
    while heap and heap[0][0] <= t_end:
        handle(heappop(heap))
    if waiting:  # cannot happen: every HOT model goes idle eventually and gives way
        raise RuntimeError(f"replay ended with {len(waiting)} models still waiting for a device")
    for m in range(n_models):
        hold[rung[m]] += t_end - since[m]
    wall = time.perf_counter() - wall0
    return _result(policy, trace, costs, size_bytes, lat, cold, stats, hold, used_image, t0, t_end, wall)


def _result(policy, trace, costs, size_bytes, lat, cold, stats, hold, used_image, t0, t_end, wall) -> dict:
    n_models = len(trace.model_names)
    gb = costs.size_gb(size_bytes)
    span = t_end - t0
    gpu_hours = hold[_HOT] * costs.device_share / 3600.0
    ram_gb_hours = hold[_PARKED] * (gb + costs.worker_ram_gb) / 3600.0
    disk_gb_months = sum(used_image) * gb * span / (HOURS_PER_MONTH * 3600.0)
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
        "cold_starts": int(cold[1] + cold[2] + cold[3]),
        "cold_starts_by_rung": {"parked": cold[1], "image": cold[2], "zero": cold[3]},
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
        "rung_hours": {r.value: hold[r.level] / 3600.0 for r in LADDER},
        "gpu_hours": gpu_hours,
        "host_ram_gb_hours": ram_gb_hours,
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


