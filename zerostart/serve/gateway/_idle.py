"""The idle ticker (docs/design.md, "Flow of idleness"): asks each model's policy where its
idle replicas rest (parks them, stops them: the default policy parks past ``park_after`` and
stops past ``idle_timeout``), keeps ``min_replicas``, pre-warm windows and the policy's pre-warms
hot. It sleeps until the next deadline it computed or until something changes (``poke``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import datetime
from typing import Iterable

from zerostart.serve.gateway import _prewarm
from zerostart.serve.gateway._lifecycle import Lifecycle
from zerostart.serve.gateway._model import Model
from zerostart.serve.gateway._replica import Replica
from zerostart.serve.gateway._state import State
from zerostart.units import format_duration

log = logging.getLogger("zerostart.serve")


class Ticker:
    def __init__(self, models: Iterable[Model], lifecycle: Lifecycle) -> None:
        self._models = list(models)
        self._lifecycle = lifecycle
        self._event = asyncio.Event()

    def poke(self) -> None:
        """Something changed: look again now."""
        self._event.set()

    async def run(self) -> None:
        while True:
            self._event.clear()
            try:
                next_at = self.tick(time.monotonic())
            except Exception:  # noqa: BLE001 - log a bug loudly, but keep scaling the other models
                log.exception("fleet tick failed")
                next_at = time.monotonic() + 1.0
            timeout = None if math.isinf(next_at) else max(0.0, next_at - time.monotonic())
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                pass

    def tick(self, now: float) -> float:
        """Stop what has been idle long enough, start what the floor asks for; return when to
        look again (monotonic seconds, inf when only an event can change anything)."""
        wall = datetime.now().astimezone()
        return min((self._tick_model(m, now, wall) for m in self._models), default=math.inf)

    def _tick_model(self, m: Model, now: float, wall: datetime) -> float:
        floor = m.floor(now, wall)
        self._lifecycle.climb(m)
        next_at = math.inf
        if m.backoff_until > now and (m.waiters or len(m.warm()) < floor):
            next_at = m.backoff_until
        next_at = min(next_at, self._move_idle_hot(m, now, floor), self._stop_idle_parked(m, now))
        if m.cfg.prewarm:
            change = _prewarm.next_change(m.cfg.prewarm, wall)
            if change is not None:
                next_at = min(next_at, now + max(0.0, (change - wall).total_seconds()))
        d = m.decide(now)
        for t in (d.recheck_at, d.prewarm_at):
            if t is not None and t > now:
                next_at = min(next_at, t)
        return next_at

    def _move_idle_hot(self, m: Model, now: float, floor: int) -> float:
        """Park or stop idle hot replicas beyond the floor, the longest idle first."""
        next_at = math.inf
        spare = len(m.warm()) - floor
        idle = sorted((r for r in m.replicas if r.state is State.HOT and r.in_flight == 0), key=lambda r: r.last_active)
        for r in idle:
            if spare <= 0:
                break
            due, action = m.next_move(r, now)
            if action == "stay" or due > now:
                next_at = min(next_at, due)
                continue
            log.info("model %s: idle for %.1f s (keep-alive %s%s): %s worker pid %s", m.name,
                     now - r.last_active, _kept(r),
                     "" if m.cfg.park_after is None else f", park after {format_duration(m.cfg.park_after)}",
                     "parking" if action == "park" else "stopping", r.pid)
            if action == "park":
                self._lifecycle.begin_park(m, r, "idle")
            else:
                self._lifecycle.begin_stop(m, r, "idle")
            spare -= 1
        return next_at

    def _stop_idle_parked(self, m: Model, now: float) -> float:
        """Stop parked replicas whose keep-alive ran out (not one that requests wait for: it is
        about to wake)."""
        next_at = math.inf
        if m.waiters or m.start_task is not None:
            return next_at
        for r in m.parked():
            due, action = m.next_move(r, now)
            if action == "stop" and due <= now:
                log.info("model %s: idle for %.1f s (keep-alive %s): stopping parked worker pid %s", m.name,
                         now - r.last_active, _kept(r), r.pid)
                self._lifecycle.begin_stop(m, r, "idle")
            else:
                next_at = min(next_at, due)
        return next_at


def _kept(r: Replica) -> str:
    """Its keep-alive, as the longest a request asked for (from the last request)."""
    return "forever" if math.isinf(r.hold_until) else f"until {format_duration(max(0.0, r.hold_until - r.last_active))} after its last request"
