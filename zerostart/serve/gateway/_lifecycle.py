"""Moving replicas along the cold ladder (docs/design.md §2): climbing (wake a parked replica, else
hand the model to the standby worker, else start a worker), parking and stopping. One climb
at a time per model; every move follows the replica table in ``_state.py``, and nothing moves
a replica down while it has a request in flight or a load in progress. Device memory is
admitted before a climb (``_memory.py`` decides whom to move down; this module moves them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Coroutine

from zerostart.engine import available_cpus
from zerostart.names import Climb, device_type
from zerostart.serve._config import ServeConfig, ServerConfig
from zerostart.serve.edge import ServeError, StartFailed, StartTimeout
from zerostart.serve.backends import ColdStart, WorkerBackend, ZerostartWorker, backend_class
from zerostart.serve.control import ImageReport, Refusal
from zerostart.serve.gateway import _queue
from zerostart.serve.gateway._memory import DeviceMemory
from zerostart.serve.gateway._metrics import Metrics
from zerostart.serve.gateway._model import Model
from zerostart.serve.gateway._replica import Replica
from zerostart.serve.gateway._standby import Standby
from zerostart.serve.gateway._state import State
from zerostart.units import format_size

log = logging.getLogger("zerostart.serve")

_WRITING = frozenset({"queued", "writing"})  # a worker's image report while a write is under way
_WRITTEN = frozenset({"written", "write_failed"})  # ... and once it ended
_IMAGE_POLL_S = (0.5, 5.0)  # how often a write under way is looked at: first, and at most (doubling)
_IMAGE_KEPT = frozenset({"used", "is_source", "queued", "writing", "written"})  # a ready image is (or will be) on disk


def cpu_threads(config: ServeConfig) -> dict[str, int | None]:
    """Each model's workers' CPU compute threads: the model's ``threads``; on CPU else the CPUs
    available less one (for the gateway and the workers' own request handling) shared evenly by
    the CPU workers that may run at once (each model's max_replicas), at least one; None on an
    accelerator. CPU inference threads wait for each other at every matmul, so one that loses
    its core stalls them all: oversubscribed, decode collapses to a fraction of its speed
    (docs/engine.md, "Threads")."""
    on_cpu = [m for m in config.models if device_type(m.device) == "cpu"]
    share = max(1, (available_cpus() - 1) // max(1, sum(m.max_replicas for m in on_cpu)))
    return {m.served_name: m.threads if m.threads is not None else share if m in on_cpu else None
            for m in config.models}


class Lifecycle:
    """Starts, wakes, parks and stops the replicas of every model. ``changed`` is called after
    every move (the idle ticker then looks again)."""

    def __init__(self, server: ServerConfig, memory: DeviceMemory, metrics: Metrics, standby: Standby,
                 changed: Callable[[], None], threads: dict[str, int | None] | None = None) -> None:
        self._server = server
        self._threads = threads or {}  # each model's workers' CPU compute threads (cpu_threads)
        self.memory = memory
        self._metrics = metrics
        self._standby = standby
        self._changed = changed
        self.socket_dir: str | None = None  # set by Fleet.start()
        self.closing = False
        self._tasks: set[asyncio.Task[Any]] = set()  # parks and stops under way
        self._followers: set[asyncio.Task[None]] = set()  # image writes followed (_watch_image)

    # -- climbing ---------------------------------------------------------------------------

    def climb(self, m: Model) -> None:
        """Climb a replica if the queue or the floor needs one (one climb at a time per model;
        the model decides: ``Model.next_climb``): wake its parked replica, else start one."""
        if self.closing:
            return
        now = time.monotonic()
        how = m.next_climb(now)
        if how is None:
            return
        m.climb_began(how, now)
        if m.climb_ahead:
            log.info("model %s: climbing ahead of requests (%s)", m.name, m.floor_reason)
        if how == "wake":
            r = max(m.parked(), key=lambda r: r.last_active)
            m.start_task = asyncio.create_task(self._wake(m, r))
        else:
            m.start_task = asyncio.create_task(self._start(m))

    async def _start(self, m: Model) -> None:
        r, spare = self._new_replica(m)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(m.cfg.start_timeout):
                await self._admit(m, r)
                t0 = time.monotonic()  # the start itself, without the wait for memory
                cold = await spare.hand_over(m.cfg, m.parkable) if spare else await r.worker.start(parkable=m.parkable)
                r.memory = await r.worker.measure_memory()
        except TimeoutError:
            where = await r.worker.current_phase() if r.pid is not None else "waiting for device memory"
            err: ServeError = StartTimeout(
                f"model {m.name!r} did not become ready within its start_timeout of {m.cfg.start_timeout:g} s "
                f"(it was in phase: {where}); raise models[].start_timeout for large models or slow storage")
            await self._start_failed(m, r, err, "timeout", standby=spare is not None)
        except StartFailed as e:
            await self._start_failed(m, r, e, e.cause, standby=spare is not None)
        except Exception as e:  # noqa: BLE001 - a bug must not wedge the model in "starting" forever
            log.exception("model %s: start failed unexpectedly", m.name)
            err = StartFailed(f"model {m.name!r} could not be started: {e!r}", cause="internal")
            await self._start_failed(m, r, err, "internal", standby=spare is not None)
        except asyncio.CancelledError:
            await self._discard(m, r)
            m.start_task = None
            raise
        else:
            self._started(m, r, cold, t0, standby=spare is not None)

    def _new_replica(self, m: Model) -> tuple[Replica, ZerostartWorker | None]:
        """A replica in ``starting``: the standby worker when it can take the model (the spare
        is returned too), else a new worker of the model's backend."""
        assert self.socket_dir is not None, "Fleet.start() was not called"
        spare = self._standby.take(m.cfg)
        worker: WorkerBackend = spare or backend_class(m.cfg.backend)(m.cfg, self._server, self.socket_dir)
        worker.memory_share = m.share
        if isinstance(worker, ZerostartWorker) and m.cfg.kv_cache_bytes is None and m.estimate_source == "headers":
            worker.weights_bytes = m.estimate  # the KV cache on a GPU is the share's rest
        worker.threads = self._threads.get(m.name)
        r = Replica(m.cfg, worker)
        worker.on_exit = lambda: self._worker_exited(m, r)
        r.transition(State.STARTING)
        m.replicas.append(r)
        return r, spare

    def _started(self, m: Model, r: Replica, cold: ColdStart, t0: float, *, standby: bool) -> None:
        r.transition(State.HOT)
        r.climbed(cold, ahead=m.climb_ahead)
        assert r.ready_at is not None
        ready_s = r.ready_at - t0
        m.failures, m.backoff_until, m.last_error = 0, 0.0, None
        m.last_cold_start, m.last_ready_s = r, ready_s
        m.last_cold_s = m.last_ready_s
        m.starts_s.append(ready_s)
        if r.image is not None and r.image.status in _IMAGE_KEPT:
            m.has_image = True
        m.max_model_len = cold.max_model_len or m.max_model_len
        self.memory.learn_size(m, r)
        self._metrics.observe_cold_start(m.name, r.climb, r.timeline, ready_s, ahead=m.climb_ahead)
        log.info("model %s: hot after %.2f s from %s (%s)", m.name, ready_s, r.climb,
                 ", ".join(f"{p.name} {p.seconds:.2f}" for p in r.timeline.phases))
        if r.image is not None and r.image.rejected:
            log.warning("model %s: its ready image %s was not used (%s); it was loaded from %s", m.name,
                        r.image.path, r.image.rejected, m.cfg.path)
        m.start_task = None
        if not m.waiters:  # climbed for a floor, not for requests: kept for idle_timeout like one
            r.hold(r.ready_at, None)
        _queue.dispatch(m)
        self._watch_image(m, r)
        if standby:
            # the next spare's imports would compete with the requests that waited for this
            # start: prepare it once they are served (at once if none waited)
            r.replenish_standby = r.in_flight > 0
            if not r.replenish_standby:
                self._standby.ensure()
        self._after_move(m)

    async def _start_failed(self, m: Model, r: Replica, err: ServeError, cause: str, *, standby: bool) -> None:
        await self._discard(m, r)
        m.failures += 1
        delay = min(m.cfg.start_backoff * 2 ** (m.failures - 1), m.cfg.start_backoff_max)
        m.backoff_until = time.monotonic() + delay
        m.last_error = err.message
        err.retry_after = delay
        self._metrics.start_failures.labels(m.name, cause).inc()
        log.error("model %s: start failed (%s); next try in %g s: %s", m.name, cause, delay, err.message)
        m.start_task = None
        if standby:
            self._standby.ensure()
        if not m.live():
            _queue.fail(m, err)
        self._changed()

    async def _admit(self, m: Model, r: Replica, need: int | None = None) -> None:
        """Reserve ``need`` bytes (the replica's estimate) on its device, moving idle replicas of
        other models down (the cheapest to bring back first) or waiting for busy ones to become
        idle; raises :class:`StartFailed` when nothing can ever make room."""
        need = (m.estimate or 0) if need is None else need
        while not self.memory.fits(m, need):
            changed = self.memory.changed
            soon = self.memory.fits_once_freed(m, need)  # what is on its way down is room enough: wait for it
            victim = None if soon else self.memory.victim(m.cfg.device, exclude=m)
            if victim is not None:
                vm, vr, action = victim
                log.info("model %s: %s idle model %s on %s to make room", m.name,
                         "parking" if action == "park" else "stopping", vm.name, m.cfg.device)
                vm.evicted_at = time.monotonic()  # its policy does not climb it back before a request
                if action == "park":
                    self.begin_park(vm, vr, "evicted")
                else:
                    self.begin_stop(vm, vr, "evicted")
            elif not soon and (err := self.memory.no_room(m, r, need)) is not None:
                raise err
            await changed.wait()
        self.memory.reserve(m, r, need)

    # -- waking -----------------------------------------------------------------------------

    async def _wake(self, m: Model, r: Replica) -> None:
        """Bring a parked replica back (a cold start of rung ``parked``). A wake that fails
        stops the worker; the held requests then get a fresh start."""
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(m.cfg.start_timeout):
                await self._admit(m, r, max(0, (m.estimate or 0) - r.reserved_bytes))
                t0 = time.monotonic()  # the wake itself, without the wait for memory
                r.transition(State.WAKING)
                log.info("model %s: waking worker pid %s", m.name, r.pid)
                cold = await r.worker.wake(m.cfg.start_timeout)
        except asyncio.CancelledError:
            await self._discard(m, r)
            m.start_task = None
            raise
        except (StartFailed, TimeoutError) as e:
            if r.state is State.PARKED:  # still waiting for device memory: it stays parked
                self._wake_waited_too_long(m, e)
                return
            await self._wake_failed(m, r, f"{e}" if isinstance(e, StartFailed) else "it timed out")
            return
        except RuntimeError as e:  # WorkerError: the wake failed, or the worker could not be reached
            await self._wake_failed(m, r, str(e))
            return
        r.transition(State.HOT)
        r.climbed(cold, ahead=m.climb_ahead)
        assert r.ready_at is not None
        m.last_cold_start, m.last_wake_s = r, r.ready_at - t0
        m.last_cold_s = m.last_wake_s
        self._metrics.observe_cold_start(m.name, Climb.PARKED, r.timeline, m.last_wake_s, ahead=m.climb_ahead)
        log.info("model %s: hot after %.3f s from parked (worker pid %s)", m.name, m.last_wake_s, r.pid)
        m.start_task = None
        if not m.waiters:
            r.hold(r.ready_at, None)
        _queue.dispatch(m)
        self._after_move(m)

    def _wake_waited_too_long(self, m: Model, e: StartFailed | TimeoutError) -> None:
        err = e if isinstance(e, StartFailed) else StartTimeout(
            f"model {m.name!r} waited its start_timeout of {m.cfg.start_timeout:g} s for device memory to wake")
        self._metrics.start_failures.labels(m.name, getattr(err, "cause", "timeout")).inc()
        m.last_error = err.message
        m.start_task = None
        _queue.fail(m, err)
        self._changed()

    async def _wake_failed(self, m: Model, r: Replica, why: str) -> None:
        log.error("model %s: waking worker pid %s failed (%s); stopping it, the next start is fresh", m.name, r.pid, why)
        self._metrics.start_failures.labels(m.name, "wake").inc()
        m.last_error = f"waking model {m.name!r} failed: {why}"
        if r.state is State.WAKING:
            r.transition(State.STOPPING)
            await self._stop(m, r, "wake_failed", rescale=False)
        m.start_task = None
        self.climb(m)  # held requests get a new worker
        self._changed()

    # -- parking ----------------------------------------------------------------------------

    def begin_park(self, m: Model, r: Replica, reason: str) -> None:
        if r.state is not State.HOT or r.in_flight:
            raise RuntimeError(f"refusing to park {r!r}: only idle hot replicas park")
        r.transition(State.PARKING)
        self._spawn(self._park(m, r, reason))

    async def _park(self, m: Model, r: Replica, reason: str) -> None:
        t0 = time.monotonic()
        try:
            result = await r.worker.park(m.cfg.start_timeout)
        except RuntimeError as e:  # WorkerError: the park failed, or the worker could not be reached
            log.error("model %s: parking worker pid %s failed (%s); stopping it", m.name, r.pid, e)
            if r.state is State.PARKING:
                r.transition(State.STOPPING)
                await self._stop(m, r, "park_failed")
            return
        if isinstance(result, Refusal):
            self._park_refused(m, r, result)
        elif r.state is State.PARKING:
            r.transition(State.PARKED)
            self.memory.parked(m, r)
            self._metrics.parks.labels(m.name, reason).inc()
            log.info("model %s: parked worker pid %s in %.3f s (%s to host RAM at %.2f GB/s; %s)", m.name, r.pid,
                     time.monotonic() - t0, format_size(result.bytes or 0), result.gbps or 0.0, reason)
        else:
            return
        self._after_move(m)

    def _park_refused(self, m: Model, r: Replica, refusal: Refusal) -> None:
        if r.state is not State.PARKING:
            return
        r.transition(State.HOT)
        r.last_active = time.monotonic()  # look again after another idle period, not at once
        if refusal.permanent:
            m.park_refused = refusal.message
            log.warning("model %s: cannot park (%s); idle replicas stop instead", m.name, refusal.message)
        else:
            log.info("model %s: worker pid %s did not park: %s", m.name, r.pid, refusal.message)

    def _after_move(self, m: Model) -> None:
        self.memory.notify()
        _queue.dispatch(m)
        self.climb(m)  # requests that arrived while it moved climb it again
        self._changed()

    # -- stopping ---------------------------------------------------------------------------

    def begin_stop(self, m: Model, r: Replica, reason: str, *, force: bool = False) -> None:
        if r.state not in (State.HOT, State.PARKED) or (r.in_flight and not force):
            raise RuntimeError(f"refusing to stop {r!r}: only idle hot or parked replicas stop")
        r.transition(State.STOPPING)
        self._spawn(self._stop(m, r, reason))

    def replace(self, m: Model, r: Replica, why: str) -> None:
        """Kill a worker the gateway cannot trust (hung, or in a state the gateway did not
        cause): its requests in flight get 502 naming ``why``, held ones a new worker."""
        if r.state not in (State.HOT, State.PARKED):
            return
        log.error("model %s: killing worker pid %s: %s", m.name, r.pid, why)
        r.failure = why
        r.transition(State.STOPPING)
        self._spawn(self._stop(m, r, "replaced", kill=True))

    async def _stop(self, m: Model, r: Replica, reason: str, *, rescale: bool = True, kill: bool = False) -> None:
        await (r.worker.kill() if kill else r.worker.stop(m.cfg.stop_timeout))
        r.transition(State.ZERO)
        self._free(m, r)
        self._metrics.stops.labels(m.name, reason).inc()
        log.info("model %s: worker pid %s stopped (%s)", m.name, r.pid, reason)
        if rescale:
            self.climb(m)
        self._changed()

    async def _discard(self, m: Model, r: Replica) -> None:
        """Kill a replica that failed to start (or whose start was cancelled)."""
        await r.worker.kill()
        if r.state is not State.ZERO:
            r.transition(State.ZERO)
        self._free(m, r)

    def _free(self, m: Model, r: Replica) -> None:
        if r in m.replicas:
            m.replicas.remove(r)
        self.memory.release(m, r)

    def _worker_exited(self, m: Model, r: Replica) -> None:
        """A worker exited unasked. A starting, parking or waking one is handled by the task
        that drives it; a hot or parked one crashed."""
        if r.state not in (State.HOT, State.PARKED):
            return
        r.transition(State.ZERO)
        self._free(m, r)
        m.last_error = r.crash_message()
        self._metrics.worker_crashes.labels(m.name).inc()
        self.climb(m)  # requests held for this model get a new worker
        self._changed()

    # -- ready images written in the background ----------------------------------------------

    def _watch_image(self, m: Model, r: Replica) -> None:
        """A replica whose worker writes a ready image after its start: follow the write until
        it ends, so status shows how it ended (a failed write is logged and counted)."""
        if r.image is None:
            return
        if r.image.status in _WRITING:
            task = asyncio.create_task(self._follow_image(m, r))
            self._followers.add(task)
            task.add_done_callback(self._followers.discard)
        elif r.image.status in _WRITTEN:  # it ended before the start was reported
            self._image_written(m, r.image)

    async def _follow_image(self, m: Model, r: Replica) -> None:
        delay = _IMAGE_POLL_S[0]
        while r.state in (State.HOT, State.PARKING, State.PARKED, State.WAKING):
            await asyncio.sleep(delay)
            delay = min(delay * 2, _IMAGE_POLL_S[1])
            image = await r.worker.image_report()
            if image is None:
                continue
            r.image = image
            if image.status not in _WRITING:
                self._image_written(m, image)
                return

    def _image_written(self, m: Model, image: ImageReport) -> None:
        self._metrics.image_writes.labels(m.name, image.status).inc()
        if image.status == "write_failed":
            log.error("model %s: writing its ready image %s failed: %s; the next start loads the source again",
                      m.name, image.path, image.error)

    # -- background moves -------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the parks and stops under way (image writes are no longer followed)."""
        for task in list(self._followers):
            task.cancel()
        await asyncio.gather(*list(self._tasks), *list(self._followers), return_exceptions=True)
