"""The fleet: every model the gateway serves, its replicas and waiting requests, the standby
worker, and the loop that moves models along the cold ladder (DESIGN.md §2, §3).

Requests ``acquire`` a replica and hold a :class:`Lease` while they are served. A model with no
replica with room holds its requests in a bounded queue and climbs one replica (one climb at a
time per model, however many requests arrive): it wakes a parked replica, else hands the model
to the standby worker, else spawns a worker. A ticker parks replicas idle past ``park_after``,
stops those whose keep-alive ran out, keeps ``min_replicas`` and pre-warm windows hot, and
consults the model's policy when it has one. Replica lifecycles follow ``_state.py``; nothing
moves a replica down while it has a request in flight or a load in progress.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import tempfile
import time
from datetime import datetime
from typing import Any

from zerostart.serve import _prewarm
from zerostart.serve._config import ConfigError, ModelConfig, ServeConfig
from zerostart.serve._errors import QueueFull, ServeError, ShuttingDown, StartFailed, StartTimeout, UnknownModel
from zerostart.serve._memory import Budget, Candidate, choose_victim, estimate_bytes
from zerostart.serve._metrics import DeviceGauges, Metrics, ModelGauges
from zerostart.serve._model import Lease, Model, Waiter
from zerostart.serve._replica import ParkRefused, Replica
from zerostart.serve._standby import Standby
from zerostart.serve._state import State
from zerostart.units import format_duration, format_size
from zerostart.weights import WeightsError

log = logging.getLogger("zerostart.serve")



class Fleet:
    """All models of one gateway. Construct it anywhere; :meth:`start` and :meth:`close` run in
    the event loop that serves requests."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._models: dict[str, Model] = {}
        devices = [m.device for m in config.models] or ["cpu"]
        standby_device = max(dict.fromkeys(devices), key=devices.count)
        limits = {dev: d.memory_budget for dev, d in config.devices.items()}
        self._budget = Budget(limits)
        for i, m in enumerate(config.models):
            where = f"models[{i}] ({m.served_name})"
            try:
                est = estimate_bytes(m)
            except (WeightsError, OSError) as e:  # OSError: a path that is neither file nor directory
                raise ConfigError(f"{where}.path: {e}") from None
            limit = limits.get(m.device)
            if est is None:
                log.info("%s: %s is not in the local cache; its memory estimate comes from its first load "
                         "(set memory_estimate to admit it against the budget before that)", where, m.path)
            elif limit is not None and est > limit:
                raise ConfigError(f"{where}: needs an estimated {format_size(est)} of {m.device} memory, more than "
                                  f"devices.{m.device}.memory_budget ({format_size(limit)}); raise the budget, or set "
                                  "memory_estimate if the estimate is wrong")
            policy = _make_policy(m.keep_alive_policy, f"{where}.keep_alive_policy") if m.keep_alive_policy else None
            self._models[m.served_name] = Model(m, est, policy)
        self._standby = Standby(config.server, device=standby_device,
                                timeout=max((m.start_timeout for m in config.models), default=300.0),
                                estimates=[m.estimate for m in self._models.values()
                                           if m.cfg.device == standby_device and m.estimate])
        self.metrics = Metrics(self._models, self._model_gauges, self._device_gauges, lambda: self._standby.ready)
        self._wake = asyncio.Event()
        self._memory_event = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._socket_dir: str | None = None
        self._own_socket_dir = False

    # -- lifecycle of the fleet itself ------------------------------------------------------

    async def start(self) -> None:
        server = self.config.server
        if server.worker_transport == "unix":
            if server.socket_dir:
                os.makedirs(server.socket_dir, exist_ok=True)
                self._socket_dir = server.socket_dir
            else:
                self._socket_dir = tempfile.mkdtemp(prefix="zerostart-")
                self._own_socket_dir = True
        else:
            self._socket_dir = ""
        self._ticker = asyncio.create_task(self._tick_loop())
        self._standby.start(self._socket_dir)

    async def close(self) -> None:
        """Answer held requests with 503, wait up to ``shutdown_timeout`` for requests in flight,
        then stop every worker."""
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        for m in self._models.values():
            self._fail_waiters(m, ShuttingDown("the server is shutting down"))
            if m.start_task is not None:
                m.start_task.cancel()
        deadline = time.monotonic() + self.config.server.shutdown_timeout
        while any(m.in_flight for m in self._models.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        starts = [m.start_task for m in self._models.values() if m.start_task is not None]
        await asyncio.gather(*starts, *list(self._tasks), return_exceptions=True)  # starts, wakes and parks end
        for m in self._models.values():
            for r in list(m.replicas):
                if r.state in (State.HOT, State.PARKED):
                    # past the shutdown grace, requests still in flight end with the server
                    self._begin_stop(m, r, "shutdown", force=True)
        await asyncio.gather(self._standby.close(self.config.server.shutdown_timeout), *list(self._tasks),
                             return_exceptions=True)
        if self._own_socket_dir and self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- requests ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._models)

    def model_config(self, name: str) -> ModelConfig:
        return self._model(name).cfg

    async def acquire(self, name: str, keep_alive: float | None = None) -> Lease:
        """A replica of ``name`` with room for one more request; held while the model starts or
        while its replicas are full. Raises :class:`ServeError` subclasses (404, 429, 503, 504)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        m = self._model(name)
        now = time.monotonic()
        self._on_arrival(m, now, keep_alive)
        if not m.live() and m.backoff_until > now:
            wait = m.backoff_until - now
            raise StartFailed(f"{m.last_error} (the next start is in {wait:.0f} s; starts back off after failures)",
                              retry_after=wait)
        if not m.waiters:
            r = m.free_replica()
            if r is not None:
                r.in_flight += 1
                return Lease(m, r, now, self.metrics, self._release)
        if len(m.waiters) >= m.cfg.max_queued:
            self._scale(m)
            raise QueueFull(f"model {name!r} already has {len(m.waiters)} requests waiting (max_queued "
                            f"{m.cfg.max_queued}); retry after Retry-After seconds", retry_after=self._retry_after(m))
        w = Waiter(asyncio.get_running_loop().create_future(), now)
        m.waiters.append(w)
        self._scale(m)
        self._dispatch(m)
        try:
            replica = await w.future
        except asyncio.CancelledError:
            if w in m.waiters:
                m.waiters.remove(w)
            elif w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                self._release(m, w.future.result())  # assigned just as the client went away
            raise
        return Lease(m, replica, w.arrived, self.metrics, self._release)

    def _model(self, name: str) -> Model:
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(self._models) or "none"
            raise UnknownModel(f"The model {name!r} does not exist on this server (served models: {known}). "
                               "GET /v1/models lists them.", param="model") from None

    def _on_arrival(self, m: Model, now: float, keep_alive: float | None) -> None:
        m.last_active = now
        m.keep_alive = m.cfg.idle_timeout if keep_alive is None else keep_alive
        m.keep_alive_explicit = keep_alive is not None
        if m.policy is not None:
            m.policy.observe_arrival(m.name, now)
        self._wake.set()

    def _release(self, m: Model, r: Replica) -> None:
        now = time.monotonic()
        r.in_flight -= 1
        r.last_active = m.last_active = now
        if m.policy is not None:
            m.policy.observe_completion(m.name, now)
        self._dispatch(m)
        if r.in_flight == 0:
            if r.replenish_standby:
                r.replenish_standby = False
                self._standby.ensure()
            self._notify_memory()  # an idle replica is an eviction candidate
            self._wake.set()

    def _dispatch(self, m: Model) -> None:
        while m.waiters:
            r = m.free_replica()
            if r is None:
                return
            w = m.waiters.popleft()
            if w.future.done():
                continue
            r.in_flight += 1
            w.future.set_result(r)

    def _fail_waiters(self, m: Model, err: ServeError) -> None:
        while m.waiters:
            w = m.waiters.popleft()
            if not w.future.done():
                w.future.set_exception(type(err)(err.message, retry_after=err.retry_after))

    def _retry_after(self, m: Model) -> float:
        """A hint for 429s: the rest of a climb in progress (by the last one of its kind), else 1 s."""
        expected = m.last_wake_s if m.climbing == "wake" else m.last_ready_s
        if m.start_task is not None and expected:
            return max(1.0, expected - (time.monotonic() - m.start_began))
        return 1.0

    # -- starting and stopping replicas -----------------------------------------------------

    def _scale(self, m: Model) -> None:
        """Climb a replica if the queue or the floor needs one (one climb at a time per model):
        wake a parked replica if there is one, else start a new one."""
        if m.start_task is not None or self._closing:
            return
        now = time.monotonic()
        warm = m.warm()
        needed = bool(m.waiters) and not any(r.has_capacity for r in warm)
        if not needed and len(warm) >= m.floor(now):
            return
        parked = m.parked()
        if parked:
            r = max(parked, key=lambda r: r.last_active)
            m.start_began, m.climbing = now, "wake"
            m.start_task = asyncio.create_task(self._wake_replica(m, r))
            return
        if any(r.state is State.PARKING for r in m.replicas):
            return  # it wakes as soon as it is parked
        if m.backoff_until > now or len(m.live()) >= m.cfg.max_replicas:
            return
        m.start_began, m.climbing = now, "start"
        m.start_task = asyncio.create_task(self._start(m))

    async def _start(self, m: Model) -> None:
        assert self._socket_dir is not None, "Fleet.start() was not called"
        spare = self._standby.take(m.cfg, m.parkable, on_exit=self._on_worker_exit)
        r = spare or Replica(m.cfg, self.config.server, self._socket_dir, on_exit=self._on_worker_exit)
        standby = spare is not None
        r.parkable = m.parkable
        r.transition(State.STARTING)
        m.replicas.append(r)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(m.cfg.start_timeout):
                await self._admit(m, r)
                if standby:
                    await r.hand_over(m.cfg, m.parkable)
                else:
                    await r.start()
        except TimeoutError:
            where = await r.current_phase() if r.pid is not None else "waiting for device memory"
            err: ServeError = StartTimeout(
                f"model {m.name!r} did not become ready within its start_timeout of {m.cfg.start_timeout:g} s "
                f"(it was in phase: {where}); raise models[].start_timeout for large models or slow storage")
            cause = "timeout"
        except StartFailed as e:
            err, cause = e, e.cause
        except Exception as e:  # noqa: BLE001 - a bug must not wedge the model in "starting" forever
            log.exception("model %s: start failed unexpectedly", m.name)
            err, cause = StartFailed(f"model {m.name!r} could not be started: {e!r}", cause="internal"), "internal"
        except asyncio.CancelledError:
            await self._discard(m, r)
            m.start_task = None
            raise
        else:
            r.transition(State.HOT)
            r.ready_at = r.last_active = time.monotonic()
            m.failures, m.backoff_until, m.last_error = 0, 0.0, None
            m.last_cold_start, m.last_ready_s = r, r.ready_at - t0
            m.last_cold_s = m.last_ready_s
            self._learn_size(m, r)
            self.metrics.observe_cold_start(m.name, r.rung, r.timeline, m.last_ready_s)
            log.info("model %s: hot after %.2f s from %s (%s)", m.name, m.last_ready_s, r.rung,
                     ", ".join(f"{p.name} {p.seconds:.2f}" for p in r.timeline.phases))
            image = r.image or {}
            if image.get("rejected"):
                log.warning("model %s: its ready image %s was not used (%s); it was loaded from %s", m.name,
                            image.get("path"), image["rejected"], m.cfg.path)
            m.start_task = None
            self._dispatch(m)
            if standby:
                # the next spare's imports would compete with the requests that waited for this
                # start: prepare it once they are served (at once if none waited)
                r.replenish_standby = r.in_flight > 0
                if not r.replenish_standby:
                    self._standby.ensure()
            self._scale(m)
            self._notify_memory()
            self._wake.set()
            return
        await self._discard(m, r)
        m.failures += 1
        delay = min(m.cfg.start_backoff * 2 ** (m.failures - 1), m.cfg.start_backoff_max)
        m.backoff_until = time.monotonic() + delay
        m.last_error = err.message
        err.retry_after = delay
        self.metrics.start_failures.labels(m.name, cause).inc()
        log.error("model %s: start failed (%s); next try in %g s: %s", m.name, cause, delay, err.message)
        m.start_task = None
        if standby:
            self._standby.ensure()
        if not m.live():
            self._fail_waiters(m, err)
        self._wake.set()

    def _learn_size(self, m: Model, r: Replica) -> None:
        """A model without an estimate (a remote source not in the cache, no memory_estimate)
        takes the size its first worker reports, and its reservation grows to match."""
        if m.estimate is not None:
            return
        size = r.info.get("weights_bytes", 0) + r.info.get("kv_bytes", 0)
        if not isinstance(size, int) or size <= 0:
            return
        m.estimate = size
        self._budget.reserve(m.cfg.device, size - r.reserved_bytes)
        r.reserved_bytes = size
        limit = self._budget.limit(m.cfg.device)
        log.info("model %s: holds %s on %s (measured; used as its memory estimate from now on)", m.name,
                 format_size(size), m.cfg.device)
        if limit is not None and self._budget.used(m.cfg.device) > limit:
            log.warning("device %s: %s reserved, over its memory budget of %s since model %s reported its size; "
                        "set memory_estimate for models loaded from remote sources", m.cfg.device,
                        format_size(self._budget.used(m.cfg.device)), format_size(limit), m.name)

    # -- waking and parking -----------------------------------------------------------------

    async def _wake_replica(self, m: Model, r: Replica) -> None:
        """Bring a parked replica back (a cold start of rung ``parked``). A wake that fails
        stops the worker; the held requests then get a fresh start."""
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(m.cfg.start_timeout):
                await self._admit(m, r, max(0, (m.estimate or 0) - r.reserved_bytes))
                r.transition(State.WAKING)
                log.info("model %s: waking worker pid %s", m.name, r.pid)
                await r.wake(m.cfg.start_timeout)
        except asyncio.CancelledError:
            await self._discard(m, r)
            m.start_task = None
            raise
        except (StartFailed, TimeoutError) as e:
            if r.state is State.PARKED:  # still waiting for device memory: it stays parked
                err = e if isinstance(e, StartFailed) else StartTimeout(
                    f"model {m.name!r} waited its start_timeout of {m.cfg.start_timeout:g} s for device memory to wake")
                self.metrics.start_failures.labels(m.name, getattr(err, "cause", "timeout")).inc()
                m.last_error = err.message
                m.start_task = None
                self._fail_waiters(m, err)
                self._wake.set()
                return
            await self._wake_failed(m, r, f"{e}" if isinstance(e, StartFailed) else "it timed out")
            return
        except RuntimeError as e:
            await self._wake_failed(m, r, str(e))
            return
        r.transition(State.HOT)
        r.ready_at = r.last_active = time.monotonic()
        r.first_token_recorded = False
        m.last_cold_start, m.last_wake_s = r, r.ready_at - t0
        m.last_cold_s = m.last_wake_s
        self.metrics.observe_cold_start(m.name, "parked", r.timeline, m.last_wake_s)
        log.info("model %s: hot after %.3f s from parked (worker pid %s)", m.name, m.last_wake_s, r.pid)
        m.start_task = None
        self._dispatch(m)
        self._scale(m)
        self._notify_memory()
        self._wake.set()

    async def _wake_failed(self, m: Model, r: Replica, why: str) -> None:
        log.error("model %s: waking worker pid %s failed (%s); stopping it, the next start is fresh", m.name, r.pid, why)
        self.metrics.start_failures.labels(m.name, "wake").inc()
        m.last_error = f"waking model {m.name!r} failed: {why}"
        if r.state is State.WAKING:
            r.transition(State.STOPPING)
            await self._stop(m, r, "wake_failed", rescale=False)
        m.start_task = None
        self._scale(m)  # held requests get a new worker
        self._wake.set()

    def _begin_park(self, m: Model, r: Replica, reason: str) -> None:
        if r.state is not State.HOT or r.in_flight:
            raise RuntimeError(f"refusing to park {r!r}: only idle hot replicas park")
        r.transition(State.PARKING)
        self._spawn(self._park(m, r, reason))

    async def _park(self, m: Model, r: Replica, reason: str) -> None:
        t0 = time.monotonic()
        try:
            stats = await r.park(m.cfg.start_timeout)
        except ParkRefused as e:
            if r.state is State.PARKING:
                r.transition(State.HOT)
                r.last_active = time.monotonic()  # look again after another idle period, not at once
                if e.code == "not_parkable":
                    m.park_refused = str(e)
                    log.warning("model %s: cannot park (%s); idle replicas stop instead", m.name, e)
                else:
                    log.info("model %s: worker pid %s did not park: %s", m.name, r.pid, e)
            self._after_move(m)
            return
        except RuntimeError as e:
            log.error("model %s: parking worker pid %s failed (%s); stopping it", m.name, r.pid, e)
            if r.state is State.PARKING:
                r.transition(State.STOPPING)
                await self._stop(m, r, "park_failed")
            return
        if r.state is not State.PARKING:
            return
        r.transition(State.PARKED)
        keep = m.parked_bytes(r)
        if r.reserved_bytes > keep:
            self._budget.release(m.cfg.device, r.reserved_bytes - keep)
            r.reserved_bytes = keep
        self.metrics.parks.labels(m.name, reason).inc()
        log.info("model %s: parked worker pid %s in %.3f s (%s to host RAM at %.2f GB/s; %s)", m.name, r.pid,
                 time.monotonic() - t0, format_size(int(stats.get("bytes", 0))), float(stats.get("gbps", 0.0)), reason)
        self._after_move(m)

    def _after_move(self, m: Model) -> None:
        self._notify_memory()
        self._dispatch(m)
        self._scale(m)  # requests that arrived while it parked wake it
        self._wake.set()

    # -- device memory and stopping --------------------------------------------------------

    async def _admit(self, m: Model, r: Replica, need: int | None = None) -> None:
        """Reserve ``need`` bytes (the replica's estimate) on its device, moving idle replicas of
        other models down (the cheapest to bring back first: parking them where that frees
        device memory, else stopping them) or waiting for busy ones to become idle."""
        dev = m.cfg.device
        need = (m.estimate or 0) if need is None else need
        while not self._budget.fits(dev, need):
            changed = self._memory_event
            victim = self._eviction_victim(dev, exclude=m)
            if victim is not None:
                vm, vr, action = victim
                log.info("model %s: %s idle model %s on %s to make room", m.name,
                         "parking" if action == "park" else "stopping", vm.name, dev)
                if action == "park":
                    self._begin_park(vm, vr, "evicted")
                else:
                    self._begin_stop(vm, vr, "evicted")
            elif not self._may_free(dev, exclude=r):
                holders = ", ".join(sorted({x.name for x in self._models.values() for y in x.replicas
                                            if y.reserved_bytes and x.cfg.device == dev})) or "nothing"
                raise StartFailed(f"model {m.name!r} needs an estimated {format_size(need)} of {dev} memory; the budget "
                                  f"is {format_size(self._budget.limit(dev) or 0)} and {format_size(self._budget.used(dev))} "
                                  f"is held by models kept hot by min_replicas or pre-warm windows ({holders})",
                                  cause="memory")
            await changed.wait()
        self._budget.reserve(dev, need)
        r.reserved_bytes += need

    def _eviction_victim(self, device: str, exclude: Model) -> tuple[Model, Replica, str] | None:
        now = time.monotonic()
        candidates = []
        for m in self._models.values():
            if m is exclude or m.cfg.device != device:
                continue
            spare = len(m.warm()) - m.floor(now)
            idle = sorted((r for r in m.replicas if r.state is State.HOT and r.in_flight == 0), key=lambda r: r.last_active)
            full_start = m.last_ready_s if m.last_ready_s is not None else math.inf
            for r in idle[:max(0, spare)]:
                if m.can_park and device != "cpu":  # parking frees its device memory and keeps it close
                    cost = m.last_wake_s if m.last_wake_s is not None else 0.0
                    candidates.append(Candidate((m, r, "park"), cost, r.last_active))
                else:
                    candidates.append(Candidate((m, r, "stop"), full_start, r.last_active))
            if not m.waiters and m.start_task is None:
                for r in m.parked():
                    if r.reserved_bytes:  # on CPU a parked replica's weights still hold host RAM
                        candidates.append(Candidate((m, r, "stop"), full_start, r.last_active))
        return choose_victim(candidates)

    def _may_free(self, device: str, exclude: Replica) -> bool:
        """Whether waiting can make room: some replica on the device is busy, climbing, or on
        its way down."""
        for m in self._models.values():
            for r in m.replicas:
                if r is exclude or m.cfg.device != device or not r.reserved_bytes:
                    continue
                if r.state in (State.STARTING, State.STOPPING, State.PARKING, State.WAKING) or r.in_flight > 0:
                    return True
        return False

    def _begin_stop(self, m: Model, r: Replica, reason: str, *, force: bool = False) -> None:
        if r.state not in (State.HOT, State.PARKED) or (r.in_flight and not force):
            raise RuntimeError(f"refusing to stop {r!r}: only idle hot or parked replicas stop")
        r.transition(State.STOPPING)
        self._spawn(self._stop(m, r, reason))

    async def _stop(self, m: Model, r: Replica, reason: str, *, rescale: bool = True) -> None:
        await r.stop(m.cfg.stop_timeout)
        r.transition(State.ZERO)
        self._free(m, r)
        self.metrics.stops.labels(m.name, reason).inc()
        log.info("model %s: worker pid %s stopped (%s)", m.name, r.pid, reason)
        if rescale:
            self._scale(m)
        self._wake.set()

    async def _discard(self, m: Model, r: Replica) -> None:
        """Kill a replica that failed to start (or whose start was cancelled)."""
        await r.kill()
        if r.state is not State.ZERO:
            r.transition(State.ZERO)
        self._free(m, r)

    def _free(self, m: Model, r: Replica) -> None:
        if r.reserved_bytes:
            self._budget.release(m.cfg.device, r.reserved_bytes)
            r.reserved_bytes = 0
        if r in m.replicas:
            m.replicas.remove(r)
        self._notify_memory()

    def _on_worker_exit(self, r: Replica) -> None:
        """A worker exited unasked. A starting, parking or waking one is handled by the task
        that drives it; a hot or parked one crashed."""
        m = self._models[r.name]
        if r.state not in (State.HOT, State.PARKED):
            return
        r.transition(State.ZERO)
        self._free(m, r)
        m.last_error = r.crash_message()
        self.metrics.worker_crashes.labels(m.name).inc()
        self._scale(m)  # requests held for this model get a new worker
        self._wake.set()

    def _notify_memory(self) -> None:
        self._memory_event.set()
        self._memory_event = asyncio.Event()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- idleness: the ticker ---------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                next_at = self._tick(time.monotonic())
            except Exception:  # noqa: BLE001 - log a bug loudly, but keep scaling the other models
                log.exception("fleet tick failed")
                next_at = time.monotonic() + 1.0
            timeout = None if math.isinf(next_at) else max(0.0, next_at - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _tick(self, now: float) -> float:
        """Stop what has been idle long enough, start what the floor asks for; return when to
        look again (monotonic seconds, inf when only an event can change anything)."""
        next_at = math.inf
        wall = datetime.now().astimezone()
        for m in self._models.values():
            floor = m.floor(now, wall)
            self._scale(m)
            if m.backoff_until > now and (m.waiters or len(m.warm()) < floor):
                next_at = min(next_at, m.backoff_until)
            spare = len(m.warm()) - floor
            idle = sorted((r for r in m.replicas if r.state is State.HOT and r.in_flight == 0),
                          key=lambda r: r.last_active)
            for r in idle:
                if spare <= 0:
                    break
                due, action = m.next_move(r, now)
                if action == "stay" or due > now:
                    next_at = min(next_at, due)
                    continue
                log.info("model %s: idle for %.1f s (keep-alive %s%s): %s worker pid %s", m.name,
                         now - r.last_active, format_duration(m.keep_alive),
                         "" if m.cfg.park_after is None else f", park after {format_duration(m.cfg.park_after)}",
                         "parking" if action == "park" else "stopping", r.pid)
                if action == "park":
                    self._begin_park(m, r, "idle")
                else:
                    self._begin_stop(m, r, "idle")
                spare -= 1
            if not m.waiters and m.start_task is None:  # a parked replica that requests wait for is about to wake
                for r in m.parked():
                    due, action = m.next_move(r, now)
                    if action == "stop" and due <= now:
                        log.info("model %s: idle for %.1f s (keep-alive %s): stopping parked worker pid %s", m.name,
                                 now - r.last_active, format_duration(m.keep_alive), r.pid)
                        self._begin_stop(m, r, "idle")
                    else:
                        next_at = min(next_at, due)
            if m.cfg.prewarm:
                change = _prewarm.next_change(m.cfg.prewarm, wall)
                if change is not None:
                    next_at = min(next_at, now + max(0.0, (change - wall).total_seconds()))
            if m.policy is not None:
                d = m.decide(now)
                for t in (d.recheck_at, d.prewarm_at):
                    if t is not None and t > now:
                        next_at = min(next_at, t)
        return next_at

    # -- what is going on -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The JSON of ``GET /zerostart/status``."""
        now = time.monotonic()
        devices = [{"device": d.device, "budget_bytes": d.budget_bytes, "reserved_bytes": d.reserved_bytes}
                   for d in self._device_gauges()]
        return {"models": [m.status(now) for m in self._models.values()], "devices": devices,
                "standby": self._standby.status()}

    def _model_gauges(self) -> list[ModelGauges]:
        out = []
        for m in self._models.values():
            counts: dict[State, int] = {}
            for r in m.replicas:
                counts[r.state] = counts.get(r.state, 0) + 1
            out.append(ModelGauges(m.name, m.state, counts, len(m.waiters), m.in_flight))
        return out

    def _device_gauges(self) -> list[DeviceGauges]:
        devices = sorted(set(self._budget.devices()) | {m.cfg.device for m in self._models.values()})
        return [DeviceGauges(d, self._budget.used(d), self._budget.limit(d)) for d in devices]


def _make_policy(spec: str, where: str) -> Any:
    try:
        from zerostart.policy import make
    except ImportError:
        raise ConfigError(f"{where}: policy specs need zerostart.policy.make, which this build lacks; "
                          "remove keep_alive_policy to use idle_timeout") from None
    try:
        return make(spec)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
