"""What a worker process holds: one model's engine, and where that model is in the worker's
life (the states and their edges are in ``serve/control.py``, next to :class:`WorkerState`).
The routes in ``_app.py`` drive it; loads, parks and wakes run on threads so the server keeps
answering meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from zerostart.names import Climb, Rung
from zerostart.serve.control import (SETTLED, ImageReport, InFlight, KVCapacity, LoadRecord, LoadSpec, ParkResult,
                                     PhasesReport, ReadyReport, WakeResult, WorkerState, check_worker)
from zerostart.serve.worker._image_writer import ImageWriter
from zerostart.serve.worker._loading import load
from zerostart.serve.worker._memory import for_serving, own_weights, release_code
from zerostart.serve.worker._structured import GrammarBudget
from zerostart.telemetry import Timeline

if TYPE_CHECKING:
    from zerostart.engine import Engine
    from zerostart.serve.worker._openai import OpenAIRoutes
    from zerostart.snapshot import EngineParking

log = logging.getLogger("zerostart.serve.worker")

_ENGINE_DRAIN_S = 2.0  # a park waits this long for sequences the engine is still finishing (cancelled streams)
# Where a model is, for the states that hold one (a standby or moving worker reports less).
_HOLDING = frozenset({WorkerState.READY, WorkerState.PARKED, WorkerState.PARKING, WorkerState.WAKING})


class NotParkable(RuntimeError):
    """This worker's model cannot be parked (the message says why)."""


class Busy(RuntimeError):
    """Requests are in flight: nothing was parked."""


@dataclass
class _InFlight:
    method: str
    path: str
    started: float  # monotonic


class Holder:
    def __init__(self, origin: float, origin_unix: float, grammar_budget: GrammarBudget | None = None) -> None:
        self.origin_unix = origin_unix
        self.grammar_budget = grammar_budget or GrammarBudget()  # what a request's grammar may cost to compile
        self.timeline = Timeline(origin=origin, label="worker")  # the load (and a standby's preparation)
        self.current = self.timeline  # the latest cold start: the load, or the latest wake
        self.state = WorkerState.STARTING
        self.phase = "import"
        self.error: str | None = None
        self.spec: LoadSpec | None = None
        self.climb: Climb | None = None  # where its latest cold start climbed from
        self.requested_s = 0.0  # when the latest cold start was asked for (seconds from origin)
        self.standby_device: str | None = None  # set once a standby worker initialized its device
        self.engine: Engine | None = None
        self.routes: OpenAIRoutes | None = None  # the OpenAI routes over the engine
        self.image = ImageReport()
        self.parkable = False
        self.parkable_error: str | None = None
        self.load_record: LoadRecord | None = None  # the load's timeline, once a wake replaced it
        self.in_flight: dict[int, _InFlight] = {}  # OpenAI requests being served, by id
        self.paused = False  # new requests wait (CUDA: while the image writer copies the weights to host)
        self.closing = False  # the worker is shutting down
        self.weights_lock = threading.Lock()  # held while the weights are read for an image, moved into own memory, or parked
        self._ids = 0
        self._parking: EngineParking | None = None
        self._writer: ImageWriter | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    # -- state and waiting ------------------------------------------------------------------

    def _set(self, state: WorkerState, phase: str | None = None) -> None:
        """Move to ``state`` (or, in the same state, to another phase) and wake long polls."""
        with self._lock:
            if state is not self.state:
                check_worker(self.state, state)
            self.state = state
            self.phase = phase or state.value
            waiters, self._waiters = self._waiters, []
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    async def wait_settled(self, timeout: float) -> None:
        """Return once the state is one of ``SETTLED`` or ``timeout`` seconds passed."""
        await self._wait_until(lambda: self.state in SETTLED, timeout)

    async def wait_unpaused(self, timeout: float) -> None:
        await self._wait_until(lambda: not self.paused, timeout)

    async def _wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ev = asyncio.Event()
            with self._lock:
                if done():
                    return
                self._waiters.append((asyncio.get_running_loop(), ev))
            try:
                await asyncio.wait_for(ev.wait(), left)
            except TimeoutError:
                return

    def pause(self, paused: bool) -> None:
        """New requests wait while paused (the image writer's host copy)."""
        with self._lock:
            self.paused = paused
            waiters, self._waiters = (self._waiters, []) if not paused else ([], self._waiters)
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    def begin_request(self, method: str, path: str) -> int:
        self._ids += 1
        self.in_flight[self._ids] = _InFlight(method, path, time.monotonic())
        return self._ids

    def end_request(self, rid: int) -> None:
        self.in_flight.pop(rid, None)

    def in_flight_json(self) -> list[InFlight]:
        now = time.monotonic()
        return [InFlight(id=rid, method=r.method, path=r.path, age_s=round(now - r.started, 3))
                for rid, r in sorted(self.in_flight.items())]

    @property
    def name(self) -> str:
        """The served name of the model it holds (``?`` before it has one)."""
        return self.spec.name if self.spec else "?"

    def engine_busy(self) -> bool:
        s = self.engine.stats() if self.engine is not None else {}
        return bool(s.get("running", 0) + s.get("waiting", 0))

    # -- starting ---------------------------------------------------------------------------

    def start(self, spec: LoadSpec) -> None:
        """A plain worker: import, then load ``spec``, on a background thread."""
        self.spec = spec
        self._set(WorkerState.LOADING, "import")
        threading.Thread(target=self._run, args=(spec, False), name="zerostart-loader", daemon=True).start()

    def start_standby(self, device: str, reserve: int = 0) -> None:
        """A standby worker: import and initialize ``device`` (and on CPU fault in ``reserve``
        bytes of host memory for the arena), then wait for :meth:`load`."""
        threading.Thread(target=self._prepare_standby, args=(device, reserve), name="zerostart-standby",
                         daemon=True).start()

    def load(self, spec: LoadSpec) -> None:
        """A standby worker's load request (call from the event loop; the state must be standby)."""
        if self.state is not WorkerState.STANDBY:
            raise RuntimeError(f"this worker is {self.state.value}, not a waiting standby worker")
        self.spec = spec
        self.requested_s = self.timeline.now()
        self._set(WorkerState.LOADING, "load")
        threading.Thread(target=self._run, args=(spec, True), name="zerostart-loader", daemon=True).start()

    def _import(self) -> None:
        t0 = time.perf_counter()
        from zerostart.engine import Engine  # noqa: F401  torch and the engine: the fixed cost of a cold start
        import zerostart.serve.worker._openai  # noqa: F401  the request path, so the first request pays for none of it
        import zerostart.snapshot  # noqa: F401  parking and ready images
        release_code()  # the import's initializers' code, ~110 MB of torch's, not run again (_memory.py)
        self.timeline.add("import", t0, time.perf_counter())

    def _prepare_standby(self, device: str, reserve: int = 0) -> None:
        try:
            self._import()
            self._set(WorkerState.STARTING, "device_init")
            # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
            from zerostart.engine import device_for

            t0 = time.perf_counter()
            dev = device_for(device)
            if dev.type == "cuda":
                # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
                from zerostart.snapshot import VmmUnavailable, require_vmm

                try:  # the VMM driver bindings a parkable load will use
                    require_vmm()
                except VmmUnavailable:
                    pass  # reported by the load that needs them
            self.timeline.add("device_init", t0, time.perf_counter(), device=str(dev))
            if reserve and dev.type == "cpu":
                # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
                from zerostart import weights

                t0 = time.perf_counter()
                weights.reserve_host(reserve)
                self.timeline.add("reserve", t0, time.perf_counter(), bytes=weights.reserved_host())
            elif reserve:
                log.warning("standby worker on %s: a host memory reserve serves CPU arenas only; none made", dev)
            self.standby_device = str(dev)
            self._set(WorkerState.STANDBY)
        except BaseException as e:  # noqa: BLE001 - reported through /zerostart/ready
            self._fail(e)

    def _run(self, spec: LoadSpec, standby: bool) -> None:
        try:
            if not standby:
                self._import()
            self._set(WorkerState.LOADING, "load")
            loaded = load(spec, self.timeline, self.standby_device)
            self.image, self.parkable, self.parkable_error = loaded.image, loaded.parkable, loaded.parkable_error
            self._set(WorkerState.LOADING, "engine_start")
            loaded.engine.start()
            # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
            from zerostart.serve.worker._openai import OpenAIRoutes

            self.routes = OpenAIRoutes(loaded.engine, spec.name, spec.model, spec.embedding, self.grammar_budget)
            self.engine = loaded.engine
            self.climb = Climb.of(loaded.rung, standby=standby)
            for_serving()  # the load's freed temporaries back to the system, the steps' kept in the heap (_memory.py)
            if spec.images == "write" and loaded.rung is Rung.ZERO:
                self.image.status = "queued"
                self._writer = ImageWriter(self, loaded.fingerprint, loaded.identity)
            self._set(WorkerState.READY)
            if self._writer is not None:
                self._writer.start()
        except BaseException as e:  # noqa: BLE001 - reported to the gateway, which stops this process
            self._fail(e)
            return
        self._own_weights(woken=False)

    def _own_weights(self, woken: bool) -> None:
        """Serving: the weights' file pages (the image's or checkpoint's, mapped as it loaded; the
        parked file's after a wake) replaced by the worker's own huge pages
        (``_memory.own_weights``; memory running out leaves the rest mapped). Parking waits for
        it; a park that came first skips it."""
        t0 = time.perf_counter()
        try:
            with self.weights_lock:
                weights = self._parking if woken else self.engine.arena if self.engine is not None else None
                if self.state is not WorkerState.READY or weights is None:
                    return
                moved = own_weights(weights)
        except OSError:  # the parked file's close (the pages' move itself stops short, never raises)
            log.warning("moving the weights into the worker's own memory failed", exc_info=True)
            return
        if moved:
            log.info("weights: %.1f MB moved from their files into the worker's own memory in %.2f s", moved / 1e6,
                     time.perf_counter() - t0)

    def _fail(self, e: BaseException) -> None:
        self.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        self._set(WorkerState.FAILED, self.phase)

    def close(self, timeout: float) -> None:
        """On shutdown: an image write not yet begun is dropped; one under way may take up to
        ``timeout`` seconds to finish (else its temporary directory is swept by a later writer)."""
        self.closing = True
        if self.routes is not None:
            self.routes.grammars.close()
        if self._writer is not None:
            self._writer.join(timeout)

    # -- parking ----------------------------------------------------------------------------

    def begin_park(self) -> None:
        """Called from the event loop: refuse (Busy / NotParkable) or move to ``parking``."""
        if self.state is not WorkerState.READY:
            raise NotParkable(f"the worker is {self.state.value}, not ready")
        if self.in_flight:
            raise Busy(f"{len(self.in_flight)} request(s) in flight")
        if not self.parkable:
            raise NotParkable(self.parkable_error or "this model was not loaded parkable (start the worker with --parkable)")
        self._set(WorkerState.PARKING)

    def park(self) -> ParkResult:
        """Run on a thread after :meth:`begin_park`. Back to ``ready`` if refused (Busy,
        NotParkable); ``failed`` if the park itself fails."""
        t0 = time.perf_counter()
        try:
            with self.weights_lock:  # an image being written reads the weights: let it finish
                waited = time.perf_counter() - t0
                parking = self._drained_parking()
                stats = parking.park()
        except (Busy, NotParkable):
            self._set(WorkerState.READY)
            raise
        except BaseException as e:
            self._fail(e)
            raise
        self._set(WorkerState.PARKED)
        return ParkResult(changed=True, park_s=round(stats.park_s, 6), bytes=stats.bytes,
                          gbps=round(stats.park_gbps, 4), kv_bytes=parking.engine.kv.nbytes, waited_s=round(waited, 6))

    def _drained_parking(self) -> EngineParking:
        """The engine's parking, once the engine finished what it was running (Busy if it does
        not within a grace period; NotParkable if its memory cannot be parked)."""
        assert self.engine is not None
        deadline = time.perf_counter() + _ENGINE_DRAIN_S
        while self.engine_busy() and time.perf_counter() < deadline:
            time.sleep(0.01)
        if self.engine_busy():
            s = self.engine.stats()
            raise Busy(f"the engine still has {s.get('running', 0)} running and {s.get('waiting', 0)} "
                       "waiting sequence(s)")
        if self._parking is None:
            # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
            from zerostart.snapshot import EngineParking

            try:
                self._parking = EngineParking(self.engine)
            except ValueError as e:
                raise NotParkable(str(e)) from None
        return self._parking

    def begin_wake(self) -> float:
        if self.state is not WorkerState.PARKED:
            raise NotParkable(f"the worker is {self.state.value}, not parked")
        self._set(WorkerState.WAKING)
        return time.perf_counter()

    def wake(self, requested: float) -> WakeResult:
        """Run on a thread after :meth:`begin_wake`; records the ``wake`` phase as this worker's
        latest cold start."""
        assert self._parking is not None
        t0 = time.perf_counter()
        try:
            stats = self._parking.wake()
        except BaseException as e:
            self._fail(e)
            raise
        t1 = time.perf_counter()
        if self.load_record is None:
            self.load_record = LoadRecord(rung=self.climb, requested_s=round(self.requested_s, 6),
                                          phases=self.timeline.to_dict()["phases"])
        tl = Timeline(origin=self.timeline.origin, label="worker wake")
        tl.add("wake", t0, t1, bytes=stats.bytes, kv_bytes=self._parking.engine.kv.nbytes)
        self.current, self.climb, self.requested_s = tl, Climb.PARKED, requested - self.timeline.origin
        self._set(WorkerState.READY)
        threading.Thread(target=self._own_weights, args=(True,), name="zerostart-own-weights", daemon=True).start()
        return WakeResult(changed=True, wake_s=round(stats.wake_s, 6), bytes=stats.bytes, gbps=round(stats.wake_gbps, 4))

    # -- reports ----------------------------------------------------------------------------

    def ready_report(self, pid: int) -> ReadyReport:
        if self.state is WorkerState.STANDBY:
            return ReadyReport(state=self.state, phase="standby", pid=pid, device=self.standby_device)
        e = self.engine
        if self.state in _HOLDING and e is not None:
            spec = self.spec
            work = e.stats()
            return ReadyReport(
                state=self.state, phase=self.phase, model=spec.name if spec else None,
                source=spec.model if spec else None, pid=pid, device=str(e.device),
                dtype=str(e.dtype).removeprefix("torch."), max_model_len=e.max_model_len, rung=self.climb,
                parkable=self.parkable, parked=self.state is WorkerState.PARKED,
                weights_bytes=int(e.weights_storage.numel() * e.weights_storage.element_size()),
                kv_bytes=int(e.kv.nbytes), kv=_kv_capacity(e), image=self.image, parkable_error=self.parkable_error,
                engine_steps=e.steps, engine_sequences=work["running"] + work["waiting"])
        return ReadyReport(state=self.state, phase=self.phase,
                           error=self.error if self.state is WorkerState.FAILED else None)

    def phases_report(self) -> PhasesReport:
        tl = self.current.to_dict()
        return PhasesReport(origin_unix=self.origin_unix, state=self.state, rung=self.climb,
                            requested_s=round(self.requested_s, 6), phases=tl["phases"], timeline=tl, image=self.image,
                            load=self.load_record)


def _kv_capacity(engine: Engine) -> KVCapacity:
    kv = engine.kv_stats()
    return KVCapacity(tokens=kv.tokens, block_tokens=kv.block_tokens, blocks=kv.blocks, slots=kv.slots,
                      bytes=kv.nbytes, paged=kv.paged, dtype=kv.dtype)
