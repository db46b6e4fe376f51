"""The watchdog tells a dead worker from a hung one: a failed probe followed by the process's
exit is left to the exit path (a crash, with the worker's last words), not a replacement."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from zerostart.serve.gateway._state import State
from zerostart.serve.gateway._watchdog import Watchdog


class _Worker:
    def __init__(self, exits_after: float | None) -> None:
        self.exited = asyncio.Event()
        self._exits_after = exits_after

    async def probe(self, *, parked: bool) -> str | None:
        if self._exits_after is not None:  # the port is already closed; the reaper is a moment behind
            asyncio.get_running_loop().call_later(self._exits_after, self.exited.set)
        return "its health route could not be reached (ConnectError)"


def _probe(exits_after: float | None) -> list[str]:
    replaced: list[str] = []
    lifecycle = SimpleNamespace(replace=lambda m, r, why: replaced.append(why))
    replica = SimpleNamespace(state=State.HOT, worker=_Worker(exits_after), exited=None)
    replica.exited = replica.worker.exited
    dog = Watchdog([], lifecycle, timeout=1.0)  # type: ignore[arg-type]
    asyncio.run(dog._probe(SimpleNamespace(name="m"), replica))  # type: ignore[arg-type]
    return replaced


def test_a_worker_that_fails_its_probe_and_exits_is_left_to_the_exit_path() -> None:
    assert _probe(exits_after=0.2) == []


def test_a_worker_that_fails_its_probe_and_lives_on_is_replaced() -> None:
    assert _probe(exits_after=None) == ["its health route could not be reached (ConnectError)"]
