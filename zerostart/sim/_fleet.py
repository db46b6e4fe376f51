"""The simulated fleet: the server's fleet (``zerostart.serve``) reduced to what decides cost
and waiting, on trace time instead of a clock. ``replay`` in ``_replay.py`` drives it.

It follows the policy caller contract (``zerostart.policy``) as the server does:

* A request for a model below HOT climbs it (a cold start from that rung); requests arriving
  during a climb join it. A request's added latency is the time from its arrival until its
  model is HOT (the climb, plus any wait for room); the service time is not added.
* A model is busy while requests are in flight or a climb is under way; it never moves down
  while busy. When it goes idle the policy decides; rechecks and pre-warms are scheduled events.
* Room (:class:`Room`): slots for HOT and PARKED models (a GPU node: its devices and the host
  RAM parked weights go to), or one memory budget that both share (a CPU server, where parked
  weights stay in the host RAM that is its device memory). A climb without room moves idle
  models down, chosen by ``policy.choose_victim`` as the server chooses them (the cheapest to
  bring back, then the least recently used): with slots, an idle HOT model goes to the
  policy's first rung below HOT (PARKED if it has none), and PARKED over its slots pushes a
  parked model to IMAGE; with a budget, idle HOT and PARKED models stop (IMAGE), as the server
  stops them on CPU. If nothing can move, the climb waits, in arrival order, until a model goes
  idle. A pre-warm moves idle models for itself but never waits and never jumps that queue.
* Costs are the time spent on each rung (``hold``); climbs count as HOT (the device is held
  while loading).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

from zerostart.policy import LADDER, Candidate, ModelView, Policy, Rung, choose_victim

HOT, PARKED, IMAGE, ZERO = LADDER
_COMPLETE, _CLIMBED, _PREWARM, _DECIDE = 0, 1, 2, 3  # event kinds


@dataclass(frozen=True)
class Room:
    """How much the simulated node holds. ``hot``/``parked``: at most that many models HOT
    (climbing included) / PARKED at once. ``budget``: bytes that HOT models (``hot_bytes``
    each: weights and KV cache) and PARKED ones (``parked_bytes``: their weights) share.
    None: unlimited."""

    hot: int | None = None
    parked: int | None = None
    budget: int | None = None
    hot_bytes: int = 0
    parked_bytes: int = 0


class _Model:
    """One model of the simulated fleet."""

    __slots__ = ("index", "name", "wake", "rung", "ready_at", "in_flight", "idle", "last_active", "idle_since",
                 "since", "gen", "prewarmed", "queued", "pending", "loaded", "evicted")

    def __init__(self, index: int, name: str, wake: dict[Rung, float], t0: float) -> None:
        self.index = index
        self.name = name
        self.wake = wake  # seconds to HOT from each rung
        self.rung = ZERO
        self.ready_at = -math.inf  # when the current climb ends
        self.in_flight = 0  # requests served or waiting for its climb
        self.idle = False  # HOT, not climbing, nothing in flight: a candidate to move down
        self.last_active = t0  # the last completion that left it idle (what the policy is told)
        self.idle_since = t0  # when it last became idle and HOT (the recency victims are chosen by)
        self.since = t0  # when it came to its current rung
        self.gen = 0  # bumps invalidate its scheduled rechecks and pre-warms
        self.prewarmed = False  # HOT by a pre-warm that no request has used yet
        self.queued = False  # waiting for room to climb
        self.pending: list[tuple[int, float]] = []  # (request, service seconds) waiting for that climb
        self.loaded = False  # climbed to HOT at least once (so it has a ready image, when images are kept)
        self.evicted = False  # moved down to make room since its last request: the policy may not climb it


class SimFleet:
    """Every model of one simulated run, its room, and the event queue."""

    def __init__(self, policy: Policy, names: list[str], wake: list[dict[Rung, float]], room: Room, size_bytes: int,
                 arrivals: list[float], t0: float, *, keep_images: bool = False) -> None:
        self.policy = policy
        self.keep_images = keep_images  # a model once loaded rests on IMAGE where the policy says ZERO
        self.room = room
        self.size_bytes = size_bytes
        self.arrivals = arrivals  # arrival time of every request, by index
        self.models = [_Model(i, name, wake[i], t0) for i, name in enumerate(names)]
        lower = [r for r in getattr(policy, "rungs", LADDER) if r is not HOT]
        # where an idle HOT model goes to make room: the policy's first lower rung with slots;
        # stopped (IMAGE) under a shared budget, where parking would free only its KV cache
        self.evict_rung = IMAGE if room.budget is not None else (lower[0] if lower else PARKED)
        self.hot_slots = room.hot if room.hot is not None else math.inf
        self.parked_slots = room.parked if room.parked is not None else math.inf
        self.count = dict.fromkeys(LADDER, 0)  # models on each rung
        self.used = 0  # bytes held against the budget
        self.hold = dict.fromkeys(LADDER, 0.0)  # model-seconds on each rung
        self.used_image = [False] * len(names)
        self.cold = dict.fromkeys(LADDER, 0)  # cold starts by the rung climbed from
        self.latency = [0.0] * len(arrivals)
        self.stats = {"prewarms": 0, "prewarm_hits": 0, "prewarms_skipped": 0, "evictions": 0, "queued": 0}
        self.t_end = arrivals[-1] if arrivals else t0
        self._waiting: deque[_Model] = deque()
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = 0

    # -- the run ----------------------------------------------------------------------------

    def open(self, t0: float, *, fresh: bool = False) -> None:
        """Every model idle at ``t0``, placed at no cost on the rung the policy picks for a model
        that has just gone idle there (HOT, except for a zero timeout) where there is room; or,
        ``fresh``, on ZERO with no history, as the server starts (the policy is asked once)."""
        self.count[ZERO] = len(self.models)
        for m in self.models:
            if fresh:
                m.last_active = -math.inf
                self._decide(m, t0)
                continue
            d = self.policy.decide(ModelView(m.name, HOT, False, t0, self.size_bytes), t0)
            rung = d.rung
            if rung is HOT and not self._fits_climb(m):
                rung = self.evict_rung
            if rung is PARKED and not self._fits_park(m):
                rung = IMAGE
            self._move(m, rung, t0)
            m.idle, m.idle_since = rung is HOT, t0
            m.gen += 1
            self._schedule(m, d.prewarm_at, d.recheck_at, t0)

    def run_until(self, t: float | None = None) -> None:
        """Handle every event due by ``t`` (None: until the last request is served, however
        late that turns out to be): completions, finished climbs, pre-warms, rechecks."""
        heap = self._heap
        while heap and heap[0][0] <= (self.t_end if t is None else t):
            when, _, kind, index, gen = heapq.heappop(heap)
            m = self.models[index]
            if kind == _COMPLETE:
                self._complete(m, when)
            elif gen != m.gen:
                continue  # superseded by a later decision or arrival
            elif kind == _CLIMBED:
                if m.in_flight == 0:
                    self._went_idle(m, when)
            elif kind == _PREWARM and m.rung is not HOT:
                self._prewarm(m, when)
            else:
                self._decide(m, when)

    def finish(self) -> None:
        """Run until the last request is served; charge every model's rung up to then."""
        self.run_until()
        if self._waiting:  # cannot happen: every HOT model goes idle eventually and gives way
            raise RuntimeError(f"replay ended with {len(self._waiting)} models still waiting for room")
        for m in self.models:
            self.hold[m.rung] += self.t_end - m.since

    def memory_gb_hours(self) -> float:
        """Memory held over the run as the server's budget counts it: HOT models their weights
        and KV cache, PARKED ones their weights where parking keeps them on the device (a shared
        budget), in GB-hours."""
        parked = self.room.parked_bytes if self.room.budget is not None else 0
        return (self.hold[HOT] * self.room.hot_bytes + self.hold[PARKED] * parked) / 1e9 / 3600.0

    # -- requests ---------------------------------------------------------------------------

    def arrive(self, i: int, index: int, t: float, service_s: float) -> None:
        """Request ``i`` for model ``index`` arrives at ``t`` and keeps it busy ``service_s``."""
        m = self.models[index]
        self.policy.observe_arrival(m.name, t)
        m.gen += 1
        m.in_flight += 1
        m.idle = m.evicted = False
        if m.queued:
            m.pending.append((i, service_s))
        elif m.rung is HOT:
            if m.prewarmed:
                self.stats["prewarm_hits"] += 1
                m.prewarmed = False
            self._serve(m, i, max(m.ready_at, t), service_s)
        elif not self._waiting and self._make_room(m, t):
            self.cold[m.rung] += 1
            self._serve(m, i, t + self._climb(m, t), service_s)
        else:
            self.stats["queued"] += 1
            m.queued = True
            m.pending.append((i, service_s))
            self._waiting.append(m)

    def _serve(self, m: _Model, i: int, start: float, service_s: float) -> None:
        self.latency[i] = start - self.arrivals[i]
        done = start + service_s
        if done > self.t_end:
            self.t_end = done
        self._push(done, _COMPLETE, m)

    def _complete(self, m: _Model, t: float) -> None:
        m.in_flight -= 1
        self.policy.observe_completion(m.name, t)
        if m.in_flight == 0:
            m.last_active = t
            self._went_idle(m, t)

    def _went_idle(self, m: _Model, t: float) -> None:
        """``m`` is HOT with nothing in flight: a model waiting for room may take its place;
        otherwise the policy decides where it rests."""
        m.idle, m.idle_since = True, t
        if self._waiting:
            self._serve_waiting(t)
        if m.idle:
            self._decide(m, t)

    # -- climbing ---------------------------------------------------------------------------

    def _climb(self, m: _Model, now: float) -> float:
        wake = m.wake[m.rung]
        self._move(m, HOT, now)
        m.loaded = True
        m.ready_at = now + wake
        return wake

    def _serve_waiting(self, now: float) -> None:
        """Climb the models waiting for room, in arrival order, while room can be made."""
        while self._waiting and self._make_room(self._waiting[0], now):
            m = self._waiting.popleft()
            m.queued = False
            self.cold[m.rung] += 1
            start = now + self._climb(m, now)
            for i, service_s in m.pending:
                self._serve(m, i, start, service_s)
            m.pending = []

    def _prewarm(self, m: _Model, now: float) -> bool:
        if self._waiting or not self._make_room(m, now):
            self.stats["prewarms_skipped"] += 1
            return False
        wake = self._climb(m, now)
        self.stats["prewarms"] += 1
        m.prewarmed = True
        m.gen += 1
        self._push(now + wake, _CLIMBED, m, m.gen)  # decide again once HOT
        return True

    # -- room -------------------------------------------------------------------------------

    def _held(self, rung: Rung) -> int:
        return self.room.hot_bytes if rung is HOT else self.room.parked_bytes if rung is PARKED else 0

    def _fits_climb(self, m: _Model) -> bool:
        if self.count[HOT] >= self.hot_slots:
            return False
        budget = self.room.budget
        return budget is None or self.used - self._held(m.rung) + self.room.hot_bytes <= budget

    def _fits_park(self, m: _Model) -> bool:
        if self.count[PARKED] >= self.parked_slots:
            return False
        budget = self.room.budget
        return budget is None or self.used - self._held(m.rung) + self.room.parked_bytes <= budget

    def _make_room(self, m: _Model, now: float) -> bool:
        """Room for ``m`` to climb, moving idle models down (``choose_victim``) if need be."""
        while not self._fits_climb(m):
            budget = self.room.budget is not None
            victim = choose_victim(
                Candidate(v, v.wake[self.evict_rung if v.rung is HOT else IMAGE], v.idle_since)
                for v in self.models
                if v is not m and (v.idle or (budget and v.rung is PARKED and not v.queued)))
            if victim is None:
                return False
            self._evict(victim, self.evict_rung if victim.rung is HOT else IMAGE, now)
        return True

    def _evict(self, m: _Model, rung: Rung, now: float) -> None:
        """Move ``m`` down to make room. Its policy still moves it further down on schedule,
        but climbs it only after its next request (as the server does: climbing it back would
        only move another model down)."""
        self.stats["evictions"] += 1
        m.evicted = True
        self._move_down(m, rung, now)
        self._decide(m, now)

    def _move_down(self, m: _Model, rung: Rung, now: float) -> None:
        """Lower ``m`` to ``rung``; PARKED without room pushes a parked model to IMAGE first
        (or ``m`` itself, when none is parked)."""
        if rung is PARKED and not self._fits_park(m):
            victim = choose_victim(Candidate(v, v.wake[IMAGE], v.idle_since) for v in self.models
                                   if v.rung is PARKED and v is not m and not v.queued)
            if victim is not None and self.room.budget is None:
                self._evict(victim, IMAGE, now)
            else:
                rung = IMAGE
        self._move(m, rung, now)

    def _move(self, m: _Model, rung: Rung, now: float) -> None:
        if rung is ZERO and self.keep_images and m.loaded:
            rung = IMAGE
        old = m.rung
        if old is rung:
            return
        self.hold[old] += now - m.since
        m.since = now
        self.count[old] -= 1
        self.count[rung] += 1
        self.used += self._held(rung) - self._held(old)
        if old is HOT:
            m.idle = m.prewarmed = False
        if rung is IMAGE:
            self.used_image[m.index] = True
        m.rung = rung

    # -- the policy -------------------------------------------------------------------------

    def _decide(self, m: _Model, now: float) -> None:
        """Ask the policy where ``m`` rests, apply it, and schedule what it asks for later."""
        busy = m.in_flight > 0 or m.ready_at > now
        d = self.policy.decide(ModelView(m.name, m.rung, busy, m.last_active, self.size_bytes), now)
        m.gen += 1
        if not busy:
            target, current = d.rung, m.rung
            if target.level > current.level:
                self._move_down(m, target, now)
                if current is HOT and self._waiting:
                    self._serve_waiting(now)
            elif target is HOT and current is not HOT:
                if not m.evicted:
                    self._prewarm(m, now)
                    return
            # a rung above the current one but below HOT (IMAGE for a model on ZERO) stays a
            # wish: as in the server, a model goes up only by climbing to HOT
            if d.prewarm_at is not None and d.prewarm_at <= now and m.rung is not HOT and not m.evicted:
                self._prewarm(m, now)
                return
        self._schedule(m, None if m.evicted else d.prewarm_at, d.recheck_at, now)

    def _schedule(self, m: _Model, prewarm_at: float | None, recheck_at: float | None, now: float) -> None:
        if prewarm_at is not None and prewarm_at > now:
            self._push(prewarm_at, _PREWARM, m, m.gen)
        if recheck_at is not None and recheck_at > now and recheck_at != prewarm_at:
            self._push(recheck_at, _DECIDE, m, m.gen)

    def _push(self, t: float, kind: int, m: _Model, gen: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, m.index, gen))
