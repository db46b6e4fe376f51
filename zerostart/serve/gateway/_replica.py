"""One replica as the fleet sees it: where it is on the lifecycle table (``_state.py``), the
requests on it, the device memory reserved for it and what its last climb cost. The worker
process behind it is its backend's business (``serve/backends``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from zerostart.names import Climb
from zerostart.serve.gateway._state import State, check
from zerostart.telemetry import Timeline

if TYPE_CHECKING:
    from zerostart.serve._config import ModelConfig
    from zerostart.serve.backends import ColdStart, Memory, UpstreamPool, WorkerBackend
    from zerostart.serve.control import ImageReport, KVCapacity

log = logging.getLogger("zerostart.serve")


class Replica:
    """A worker for one model. ``state`` follows the table in ``_state.py``: the fleet drives
    the transitions, the backend (``worker``) does the process work."""

    def __init__(self, model: ModelConfig, worker: WorkerBackend) -> None:
        self.model = model
        self.name = model.served_name
        self.worker = worker
        self.state = State.ZERO
        self._requests: dict[int, float] = {}  # the requests it serves: ticket -> when it took them (monotonic)
        self._tickets = 0
        self.last_active = time.monotonic()
        self.ahead = False  # its latest climb began with nobody waiting, and it has served nobody since
        # Keep-alive (docs/serve.md, Idleness): the longest any request asked for wins until it
        # expires. explicit_until: the requests that set keep_alive hold it until then (against
        # any policy); timeout_from: the latest request that did not (or a climb nobody waited
        # for), from which its policy's own keep-alive counts.
        self.explicit_until = -math.inf
        self.timeout_from = -math.inf
        self.failure: str | None = None  # why the gateway killed it (hung, or in a state the gateway did not cause)
        self.reserved_bytes = 0  # device bytes the budget holds for it
        self.timeline = Timeline(label=f"{self.name} cold start")  # its latest climb (then its first token)
        self.climb = Climb.SOURCE  # where it last climbed from
        self.image: ImageReport | None = None  # what the worker did with ready images
        self.kv: KVCapacity | None = None  # what its engine's KV cache holds (zerostart workers)
        self.standby_record: dict[str, Any] | None = None  # a standby worker's own start, before the hand-over
        self.memory: Memory | None = None  # what it holds, as measured once it was ready
        self.replenish_standby = False  # taken from the standby: prepare the next spare once idle
        self.ready_at: float | None = None  # monotonic
        self.first_token_recorded = False

    def __repr__(self) -> str:
        return f"<Replica {self.name}#{self.worker.id} {self.state.value} pid={self.pid} in_flight={self.in_flight}>"

    def transition(self, dst: State) -> None:
        check(self.state, dst, f"{self.name} replica #{self.worker.id}")
        log.debug("%s replica #%d: %s -> %s", self.name, self.worker.id, self.state.value, dst.value)
        self.state = dst

    def climbed(self, cold: ColdStart, *, ahead: bool) -> None:
        """It reached ready (a start, a hand-over or a wake) as ``cold`` describes; ``ahead``:
        nobody was waiting for it (a floor or a policy's pre-warm)."""
        self.timeline, self.climb, self.image = cold.timeline, cold.climb, cold.image
        self.kv = cold.kv or self.kv  # a wake reports none: the cache is the one the load made
        if cold.standby is not None:
            self.standby_record = cold.standby
        self.ready_at = self.last_active = time.monotonic()
        self.ahead = ahead
        self.first_token_recorded = False

    @property
    def has_capacity(self) -> bool:
        return self.state is State.HOT and self.in_flight < self.model.max_concurrency

    # -- requests in flight -------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def begin(self, now: float) -> int:
        """A request takes room on it; the ticket gives the room back (:meth:`end`)."""
        self._tickets += 1
        self._requests[self._tickets] = now
        self.ahead = False
        return self._tickets

    def end(self, ticket: int) -> None:
        self._requests.pop(ticket, None)

    def oldest_request_s(self, now: float) -> float:
        """How long its oldest request in flight has been served (0 with none): a request
        that never ends (a leaked slot) shows here."""
        return now - min(self._requests.values()) if self._requests else 0.0

    def hold(self, now: float, keep_alive: float | None) -> None:
        """A request (or a climb, with None) keeps it for ``keep_alive`` seconds from ``now``
        (None: as long as its policy keeps a model idle since ``now``; the default policy's is
        idle_timeout), unless something holds it longer."""
        if keep_alive is None:
            self.timeout_from = max(self.timeout_from, now)
        else:
            self.explicit_until = max(self.explicit_until, now + keep_alive)

    @property
    def hold_until(self) -> float:
        """When its holds run out, the model's idle_timeout counted for those without keep_alive."""
        default = self.timeout_from + self.model.idle_timeout if self.timeout_from > -math.inf else -math.inf
        return max(self.explicit_until, default)

    # -- the worker's process ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.worker.pid

    @property
    def address(self) -> str | None:
        return self.worker.address

    @property
    def upstream(self) -> UpstreamPool | None:
        return self.worker.upstream

    @property
    def exited(self) -> asyncio.Event:
        return self.worker.exited

    def crash_message(self) -> str:
        if self.failure is not None:
            return (f"the worker for model {self.name!r} (pid {self.pid}) was killed by the gateway: {self.failure}. "
                    "Retry: the next request starts a new worker.")
        return self.worker.crash_message()
