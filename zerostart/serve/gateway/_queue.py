"""Requests held for a model: a bounded queue per model while it climbs or while its replicas
are full, handed to replicas in arrival order as they have room. A request's hold on a
replica is a :class:`Lease`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Callable

from zerostart.serve._errors import ServeError
from zerostart.serve.gateway._model import Model, Waiter

if TYPE_CHECKING:
    from zerostart.serve.gateway._metrics import Metrics
    from zerostart.serve.gateway._replica import Replica

Release = Callable[[Model, "Replica"], None]


def hold(m: Model, now: float) -> Waiter:
    """Hold a request at the back of ``m``'s queue."""
    w = Waiter(asyncio.get_running_loop().create_future(), now)
    m.waiters.append(w)
    return w


async def wait(m: Model, w: Waiter, release: Release) -> Replica:
    """The replica ``w`` was handed. A request that goes away while held leaves the queue (or,
    handed a replica just as it left, gives it back)."""
    try:
        return await w.future
    except asyncio.CancelledError:
        if w in m.waiters:
            m.waiters.remove(w)
        elif w.future.done() and not w.future.cancelled() and w.future.exception() is None:
            release(m, w.future.result())  # assigned just as the client went away
        raise


def dispatch(m: Model) -> None:
    """Hand held requests, oldest first, to replicas with room."""
    while m.waiters:
        r = m.free_replica()
        if r is None:
            return
        w = m.waiters.popleft()
        if w.future.done():
            continue
        r.in_flight += 1
        w.future.set_result(r)


def fail(m: Model, err: ServeError) -> None:
    """Answer every held request with ``err``."""
    while m.waiters:
        w = m.waiters.popleft()
        if not w.future.done():
            w.future.set_exception(type(err)(err.message, retry_after=err.retry_after))


def retry_after(m: Model) -> float:
    """A hint for 429s: the rest of a climb in progress (by the last one of its kind), else 1 s."""
    expected = m.last_wake_s if m.climbing == "wake" else m.last_ready_s
    if m.start_task is not None and expected:
        return max(1.0, expected - (time.monotonic() - m.start_began))
    return 1.0


class Lease:
    """A request's hold on one replica: while any lease is open the replica is not stopped.
    Call :meth:`release` when the response is finished (extra calls are ignored)."""

    def __init__(self, model: Model, replica: Replica, arrived: float, metrics: Metrics, release: Release) -> None:
        self._model = model
        self._metrics = metrics
        self._release = release
        self.replica = replica
        self.arrived = arrived
        self.dispatched = time.monotonic()
        ready = replica.ready_at or self.dispatched
        # Time this request spent waiting for a start, and then for room on the replica.
        self.cold_start_ms = max(0.0, ready - arrived) * 1000.0
        self.queue_ms = max(0.0, self.dispatched - max(ready, arrived)) * 1000.0
        self._released = False
        self._first_byte = False

    def first_byte(self, *, streamed: bool) -> None:
        """The worker's response started (a streamed request's first token). The first request
        a new replica serves completes its cold-start timeline with the first_token phase."""
        if self._first_byte:
            return
        self._first_byte = True
        now = time.monotonic()
        if streamed:
            self._metrics.ttft.labels(self._model.name).observe(now - self.arrived)
        r = self.replica
        if r.ready_at is not None and not r.first_token_recorded:
            r.first_token_recorded = True
            began = max(r.ready_at, self.dispatched)
            end = r.timeline.now()
            r.timeline.add_relative("first_token", end - (now - began), end, streamed=streamed)
            self._metrics.observe_first_token(self._model.name, r.rung, now - began)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self._model, self.replica)
