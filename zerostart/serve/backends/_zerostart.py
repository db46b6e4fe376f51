"""The ``zerostart`` backend: zerostart's own worker process (``python -m zerostart.serve.worker``),
driven through its control routes (``serve/control.py``).

Everything the ladder has: ready images (``images``), parking (CUDA VMM / CPU memfd) and the
standby worker: a worker made without a model imports and initializes its device, then waits;
:meth:`ZerostartWorker.hand_over` makes it a replica of a model. A new worker and the standby
get the same :class:`~zerostart.serve.control.LoadSpec` (:meth:`ZerostartWorker.spec`): on the
command line, or in ``POST /zerostart/load``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from zerostart.names import Climb
from zerostart.serve.edge import StartFailed
from zerostart.serve.backends._base import ColdStart, Memory, WorkerBackend, WorkerError
from zerostart.serve.backends._process import CONNECT_TIMEOUT_S, Moment
from zerostart.serve.control import (ErrorBody, ImageReport, LoadSpec, ParkResult, PhasesReport, ReadyReport, Refusal,
                                     WakeResult, WorkerState, load_spec)
from zerostart.telemetry import Timeline

if TYPE_CHECKING:
    from zerostart.serve._config import ModelConfig, ServerConfig

log = logging.getLogger("zerostart.serve")

_READY_POLL_S = 30.0  # one long poll of the worker's ready route
_WORKER = "zerostart.serve.worker"  # python -m ...


class ZerostartWorker(WorkerBackend):
    name = "zerostart"

    def __init__(self, model: ModelConfig | None, server: ServerConfig, socket_dir: str, *,
                 standby_device: str | None = None, standby_reserve: int = 0) -> None:
        super().__init__(model, server, socket_dir)
        self.standby_device = standby_device  # a standby worker: the device it initializes
        self.standby_reserve = standby_reserve  # and the host memory it faults in for the arena (CPU)
        self.standby_record: dict[str, Any] | None = None  # a standby worker's own start, before the hand-over
        self._parkable = False
        self._ready: ReadyReport | None = None  # the worker's last ready report
        self._phase = "spawn"
        self._progress: tuple[int, float] | None = None  # the engine's step count, and when the probe first saw it
        self.weights_bytes: int | None = None  # the model's weights as held (the fleet's estimate), to size the KV cache

    def _kv_cache_bytes(self, model: ModelConfig) -> int | None:
        """``kv_cache_bytes``, else on a GPU what the replica's memory share leaves after its
        weights (the engine's own default takes 90 % of the free memory: a second model on the
        same GPU would find none)."""
        if model.kv_cache_bytes is not None or model.device == "cpu":
            return model.kv_cache_bytes
        if self.memory_share is None or self.weights_bytes is None or self.memory_share <= self.weights_bytes:
            return None
        return self.memory_share - self.weights_bytes

    def spec(self, model: ModelConfig) -> LoadSpec:
        """What this replica's worker loads: ``model``'s entry, sized for this replica."""
        return load_spec(model, parkable=self._parkable, kv_cache_bytes=self._kv_cache_bytes(model), threads=self.threads)

    def __repr__(self) -> str:
        return f"<ZerostartWorker {self.process.label}#{self.id} pid={self.pid}>"

    # -- climbing ---------------------------------------------------------------------------

    async def start(self, *, parkable: bool) -> ColdStart:
        self._parkable = parkable
        spawned = await self._spawn()
        await self._await_ready("while loading")
        return await self._cold_start(spawned, spawned=True)

    async def start_standby(self) -> None:
        """Spawn a standby worker and return once it has imported and initialized its device."""
        spawned = await self._spawn()
        await self._await_ready("while preparing as a standby worker", want=WorkerState.STANDBY)
        body = await self._phases()
        shift = body.origin_unix - spawned.unix
        tl = Timeline(label="standby worker")
        phases = [p.to_json() for p in body.phases]
        tl.add_relative("spawn", 0.0, max(0.0, shift + min((p.start_s for p in body.phases), default=0.0)))
        tl.merge({"phases": phases}, shift=shift)
        self.standby_record = {"pid": self.pid, "device": self.standby_device, "phases": tl.to_dict()["phases"]}

    async def hand_over(self, model: ModelConfig, parkable: bool) -> ColdStart:
        """Make this standby worker a replica of ``model``: it loads it with its imports and
        device init already done. Raises :class:`StartFailed` like :meth:`start`."""
        self.assign(model)
        self._parkable = parkable
        client = self.process.client
        assert client is not None
        if self.standby_record is not None:
            self.standby_record["waited_s"] = round(time.monotonic() - self.process.spawned_at, 3)
        begin = Moment.now()
        name = model.served_name
        try:
            r = await client.post("/zerostart/load", content=self.spec(model).model_dump_json(),
                                  headers={"content-type": "application/json"}, timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise StartFailed(f"the standby worker (pid {self.pid}) did not take model {name!r}: {e!r}",
                              cause="exit") from None
        if r.status_code != 202:
            raise StartFailed(f"the standby worker (pid {self.pid}) refused model {name!r}: HTTP {r.status_code} "
                              f"{r.text[:300]}", cause="internal")
        await self._await_ready("while loading")
        cold = await self._cold_start(begin, spawned=False)
        cold.standby = self.standby_record
        return cold

    def assign(self, model: ModelConfig) -> None:
        """This standby worker now belongs to ``model`` (before :meth:`hand_over` loads it)."""
        self.model, self.process.label = model, model.served_name

    async def _spawn(self) -> Moment:
        spawned = await self.process.spawn(self._command, self.child_env())
        if self.model is None:
            log.info("standby worker: starting pid %d on %s (%s)", self.pid, self.standby_device, self.address)
        else:
            log.info("model %s: starting worker pid %d (%s)", self.model.served_name, self.pid, self.address)
        return spawned

    def _command(self, fd: int) -> list[str]:
        # every value as --key=value: a value that begins with "-" would otherwise be read as an option;
        # the worker process's own limits (the server's) as flags, what it loads as one LoadSpec
        server = self.server
        cmd = [sys.executable, "-m", _WORKER, f"--fd={fd}", f"--grammar-timeout={server.grammar_timeout}",
               f"--max-grammar-bytes={server.max_grammar_bytes}"]
        if self.model is None:
            cmd += ["--standby", f"--device={self.standby_device or 'cpu'}"]
            if self.standby_reserve:
                cmd.append(f"--reserve={self.standby_reserve}")
            return cmd
        return cmd + [f"--spec={self.spec(self.model).model_dump_json()}"]

    # -- readiness and phases ---------------------------------------------------------------

    async def _await_ready(self, when: str, want: WorkerState = WorkerState.READY) -> None:
        ready = asyncio.create_task(self._wait_ready(want))
        exited = asyncio.create_task(self.exited.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not ready.done():
                ready.cancel()
        if not ready.done() or ready.cancelled():
            raise StartFailed(self.process.exit_message(when), cause="exit")
        exc = ready.exception()
        if isinstance(exc, StartFailed):
            raise exc
        if exc is not None:
            raise StartFailed(f"the worker for model {self._label!r} answered its ready route unexpectedly: {exc!r}",
                              cause="exit")

    async def _wait_ready(self, want: WorkerState) -> None:
        while True:
            report = await self._poll_ready()
            if report is None:
                continue
            status, body = report
            self._phase = body.phase or self._phase
            if status == 200 and body.state is want:
                if want is WorkerState.READY:
                    self._ready = body
                return
            if body.state is WorkerState.FAILED:
                where = self.model.path if self.model is not None else f"a standby worker on {self.standby_device}"
                raise StartFailed(f"model {self._label!r} failed to load from {where}: {body.error}")
            if status == 200:
                raise StartFailed(f"the worker for model {self._label!r} is {body.state.value!r}, expected "
                                  f"{want.value!r}", cause="internal")

    async def _poll_ready(self) -> tuple[int, ReadyReport] | None:
        """One long poll of the ready route; None while the worker does not accept yet."""
        client = self.process.client
        assert client is not None
        try:
            r = await client.get("/zerostart/ready", params={"wait": _READY_POLL_S},
                                 timeout=httpx.Timeout(_READY_POLL_S + 5.0, connect=CONNECT_TIMEOUT_S))
        except httpx.TransportError:
            if self.exited.is_set():
                raise StartFailed(self.process.exit_message("while loading"), cause="exit") from None
            await asyncio.sleep(0.05)
            return None
        return r.status_code, ReadyReport.model_validate_json(r.content)

    async def _phases(self) -> PhasesReport:
        client = self.process.client
        assert client is not None
        try:
            r = await client.get("/zerostart/phases", timeout=CONNECT_TIMEOUT_S)
            r.raise_for_status()
            return PhasesReport.model_validate_json(r.content)
        except (httpx.HTTPError, ValidationError) as e:
            raise StartFailed(f"the worker for model {self._label!r} did not report its load phases ({e!r})",
                              cause="exit") from None

    async def _cold_start(self, begin: Moment, *, spawned: bool) -> ColdStart:
        """This climb's phases from the worker, on a timeline that begins at ``begin`` (the
        spawn, the hand-over to a standby worker, or the wake). The worker's phases are relative
        to its own origin (the first line it ran); only those after the worker was asked for
        this climb belong to it (a standby's imports happened before)."""
        body = await self._phases()
        shift = body.origin_unix - begin.unix
        phases = [p.to_json() for p in body.phases if not body.requested_s or p.end_s > body.requested_s]
        timeline = Timeline(origin=begin.perf, label=f"{self._label} cold start")
        if spawned:
            # Spawn ends where the worker's first phase begins (its HTTP server is up by then).
            first = min((float(p["start_s"]) for p in phases), default=0.0)
            timeline.add_relative("spawn", 0.0, max(0.0, shift + first))
        timeline.merge({"phases": phases}, shift=shift)
        climb = body.rung or (self._ready.rung if self._ready is not None else None) or Climb.SOURCE
        ready = self._ready
        return ColdStart(timeline=timeline, climb=climb, image=body.image,
                         max_model_len=ready.max_model_len if ready is not None else None,
                         kv=ready.kv if ready is not None else None)

    async def current_phase(self) -> str:
        client = self.process.client
        if client is not None and not self.exited.is_set():
            try:
                r = await client.get("/zerostart/ready", params={"wait": 0}, timeout=1.0)
                self._phase = ReadyReport.model_validate_json(r.content).phase or self._phase
            except (httpx.HTTPError, ValidationError):
                pass
        return self._phase

    async def probe(self, *, parked: bool) -> str | None:
        """Its ready report must say ``ready`` (``parked`` for a parked replica): a worker in
        another state was moved by someone other than its gateway, or has failed. The report
        comes from the worker's event loop, which runs no request's work (that is on threads),
        so the caller's deadline (``server.worker_probe_timeout``) is the only one; and while
        its engine has sequences, the engine's step count must move within that deadline too."""
        report = await self._report(timeout=None)
        if isinstance(report, str):
            return report
        want = WorkerState.PARKED if parked else WorkerState.READY
        if report.state is not want:
            what = f": {report.error}" if report.error else ""
            return f"it reports it is {report.state.value}{what}, where the gateway has it {want.value}"
        return None if parked else self._engine_moves(report)

    def _engine_moves(self, report: ReadyReport) -> str | None:
        """None while the engine is idle or has run a step since the last probe that saw it move;
        else (no step for ``server.worker_probe_timeout`` with sequences waiting) what is wrong."""
        now = time.monotonic()
        steps, work = report.engine_steps, report.engine_sequences
        if steps is None or not work:
            self._progress = None
            return None
        if self._progress is None or self._progress[0] != steps:  # work first seen, or a step since
            self._progress = (steps, now)
            return None
        stalled = now - self._progress[1]
        if stalled < self.server.worker_probe_timeout:
            return None
        return (f"its engine has run no step for {stalled:.0f} s with {work} sequence(s) waiting or running "
                f"(server.worker_probe_timeout {self.server.worker_probe_timeout:g} s)")

    async def image_report(self) -> ImageReport | None:
        report = await self._report()
        return None if isinstance(report, str) else report.image

    async def _report(self, timeout: float | None = CONNECT_TIMEOUT_S) -> ReadyReport | str:
        """Its ready report now, or what went wrong asking for it (``timeout`` None: the caller bounds the wait)."""
        client = self.process.client
        if client is None or self.exited.is_set():
            return "it is not running"
        try:
            r = await client.get("/zerostart/ready", params={"wait": 0}, timeout=timeout)
            return ReadyReport.model_validate_json(r.content)
        except httpx.HTTPError as e:
            return f"its ready route could not be reached ({type(e).__name__}: {e})"
        except ValidationError:
            return f"its ready route answered HTTP {r.status_code} with an unexpected body"

    async def measure_memory(self) -> Memory | None:
        """From the worker's ready report: its weights arena and KV cache. Parked, a CPU worker
        keeps its weights in host RAM (the CPU's device memory); an accelerator keeps nothing."""
        r = self._ready
        if r is None or r.weights_bytes is None or r.kv_bytes is None:
            return None
        on_cpu = (r.device or "cpu").startswith("cpu")
        return Memory(held_bytes=r.weights_bytes + r.kv_bytes, parked_bytes=r.weights_bytes if on_cpu else 0)

    # -- parking ----------------------------------------------------------------------------

    async def park(self, timeout: float) -> ParkResult | Refusal:
        self._progress = None  # the engine's steps are watched afresh after a park or a wake
        r, body = await self._control("/zerostart/park", "parking", timeout)
        if r.status_code == 409:
            err = ErrorBody.model_validate(body).error
            if err.code in ("busy", "not_ready", "not_parkable"):
                return Refusal.model_validate({"code": err.code, "message": err.message})
        if r.status_code != 200:
            raise WorkerError(_error_message(body, r.status_code))
        return ParkResult.model_validate(body)

    async def wake(self, timeout: float) -> ColdStart:
        self._progress = None
        begin = Moment.now()
        r, body = await self._control("/zerostart/wake", "waking", timeout)
        if r.status_code != 200:
            raise WorkerError(_error_message(body, r.status_code))
        WakeResult.model_validate(body)
        try:
            cold = await self._cold_start(begin, spawned=False)
        except StartFailed as e:
            raise WorkerError(e.message) from None
        cold.climb = Climb.PARKED
        return cold

    async def _control(self, route: str, doing: str, timeout: float) -> tuple[httpx.Response, dict[str, Any]]:
        client = self.process.client
        assert client is not None
        try:
            r = await client.post(route, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S))
            return r, r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise WorkerError(f"{doing} the worker for model {self._label!r} (pid {self.pid}) failed: {e!r}") from None

    @property
    def _label(self) -> str:
        return self.process.label


def _error_message(body: dict[str, Any], status: int) -> str:
    try:
        return ErrorBody.model_validate(body).error.message
    except ValidationError:
        return f"HTTP {status}"
