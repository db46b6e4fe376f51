"""The watchdog: every few seconds each live worker (hot or parked) is asked whether it is
alive and where the gateway put it (``WorkerBackend.probe``). A worker that leaves the probe
unanswered for ``server.worker_probe_timeout`` is hung; one that reports another state (parked
behind the gateway's back, failed) cannot be trusted. Either way it is killed and replaced
(``Lifecycle.replace``): its requests in flight get 502 naming why, rather than waiting for
ever on a worker that will not answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable

from zerostart.serve.gateway._lifecycle import Lifecycle
from zerostart.serve.gateway._model import Model
from zerostart.serve.gateway._replica import Replica
from zerostart.serve.gateway._state import State

log = logging.getLogger("zerostart.serve")

PROBE_EVERY_S = 5.0  # between two probes of one worker (at most; twice per timeout for short ones)
_EXIT_GRACE_S = 3.0  # a worker that fails its probe and exits within this crashed (it did not hang)


class Watchdog:
    def __init__(self, models: Iterable[Model], lifecycle: Lifecycle, timeout: float) -> None:
        self._models = list(models)
        self._lifecycle = lifecycle
        self._timeout = timeout
        self._every = min(PROBE_EVERY_S, timeout / 2)
        self._probing: dict[Replica, asyncio.Task[None]] = {}

    async def run(self) -> None:
        try:
            while True:
                for m in self._models:
                    for r in m.replicas:
                        if r.state in (State.HOT, State.PARKED) and r not in self._probing:
                            task = asyncio.create_task(self._probe(m, r))
                            self._probing[r] = task

                            def forget(_: asyncio.Task[None], r: Replica = r) -> None:
                                self._probing.pop(r, None)

                            task.add_done_callback(forget)
                await asyncio.sleep(self._every)
        finally:
            for task in list(self._probing.values()):
                task.cancel()

    async def _probe(self, m: Model, r: Replica) -> None:
        state = r.state
        try:
            async with asyncio.timeout(self._timeout):
                why = await r.worker.probe(parked=state is State.PARKED)
        except TimeoutError:
            why = f"it did not answer its health probe within {self._timeout:g} s (server.worker_probe_timeout)"
        if why is None or r.state is not state:  # fine, or moved meanwhile (by the gateway): look again later
            return
        try:  # a dead worker is not a hung one: its exit is reported as a crash, with its last words
            await asyncio.wait_for(r.exited.wait(), _EXIT_GRACE_S)
            return
        except TimeoutError:
            pass
        if r.state is not state:
            return
        self._lifecycle.replace(m, r, why)
