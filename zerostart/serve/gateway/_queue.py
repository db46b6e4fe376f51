"""Requests held for a model: a bounded queue per model while it climbs or while its replicas
are full, handed to replicas in arrival order as they have room. A request's hold on a
replica is a :class:`Lease`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Callable

from zerostart.serve.edge import ServeError
from zerostart.serve.gateway._model import Model, Waiter

if TYPE_CHECKING:
    from zerostart.serve.gateway._metrics import Metrics
    from zerostart.serve.gateway._replica import Replica

# (model, replica, ticket, keep_alive): a request gives its room on the replica back
Release = Callable[[Model, "Replica", int, "float | None"], None]


def hold(m: Model, now: float) -> Waiter:
    """Hold a request at the back of ``m``'s queue."""
    w = Waiter(asyncio.get_running_loop().create_future(), now)
    m.waiters.append(w)
    return w


async def wait(m: Model, w: Waiter, release: Release) -> tuple[Replica, int]:
    """The replica ``w`` was handed, and its ticket there. A request that goes away while held
    leaves the queue (or, handed a replica just as it left, gives its room back)."""
    try:
        return await w.future
    except asyncio.CancelledError:
        if w in m.waiters:
            m.waiters.remove(w)
        elif w.future.done() and not w.future.cancelled() and w.future.exception() is None:
            r, ticket = w.future.result()  # assigned just as the client went away
            release(m, r, ticket, None)
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
        w.future.set_result((r, r.begin(time.monotonic())))


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
    Made and given back by ``Fleet.lease`` only (its context; extra releases are ignored).
    ``keep_alive``: the request's own (None: the model's idle_timeout), held from now and
    from its release."""

    def __init__(self, model: Model, replica: Replica, ticket: int, arrived: float, keep_alive: float | None,
                 metrics: Metrics, release: Release) -> None:
        self.model = model
        self._metrics = metrics
        self._release = release
        self.replica = replica
        self.ticket = ticket
        self.arrived = arrived
        self.keep_alive = keep_alive
        self.dispatched = time.monotonic()
        replica.hold(self.dispatched, keep_alive)
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
            self._metrics.ttft.labels(self.model.name).observe(now - self.arrived)
        r = self.replica
        if r.ready_at is not None and not r.first_token_recorded:
            r.first_token_recorded = True
            began = max(r.ready_at, self.dispatched)
            end = r.timeline.now()
            r.timeline.add_relative("first_token", end - (now - began), end, streamed=streamed)
            self._metrics.observe_first_token(self.model.name, r.climb, now - began)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self.model, self.replica, self.ticket, self.keep_alive)
