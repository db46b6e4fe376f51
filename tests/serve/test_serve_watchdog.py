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


def test_an_engine_that_runs_no_step_while_it_has_work_fails_its_probe(tmp_path, monkeypatch) -> None:
    """The event loop answers, but the engine thread is stuck (a wedged kernel, a dead thread):
    with sequences waiting, its step count must move within worker_probe_timeout."""
    from zerostart.serve._config import ServerConfig
    from zerostart.serve.backends import _zerostart
    from zerostart.serve.control import ReadyReport, WorkerState

    now = [1000.0]
    monkeypatch.setattr(_zerostart.time, "monotonic", lambda: now[0])
    worker = _zerostart.ZerostartWorker(None, ServerConfig(worker_probe_timeout=10), str(tmp_path))

    def probe(steps: int, sequences: int, after: float) -> str | None:
        now[0] += after
        return worker._engine_moves(ReadyReport(state=WorkerState.READY, phase="ready", engine_steps=steps,
                                                engine_sequences=sequences))

    assert probe(5, 0, 0) is None
    assert probe(5, 0, 60) is None  # idle: nothing to move for
    assert probe(5, 2, 1) is None  # work arrived: watched from here
    assert probe(5, 2, 9) is None  # 9 s without a step: within the timeout
    assert probe(6, 2, 0.5) is None  # it moved: watched afresh
    assert probe(6, 2, 9.9) is None
    why = probe(6, 2, 0.2)  # 10.1 s without a step while 2 sequences wait
    assert why is not None and "no step for 10 s with 2 sequence(s)" in why and "worker_probe_timeout" in why, why
    worker._progress = None  # a park or a wake: watched afresh
    assert probe(6, 2, 100) is None
