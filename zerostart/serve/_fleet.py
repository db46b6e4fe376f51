"""The fleet: every model the gateway serves, its replicas and waiting requests, and the loop
that scales them (DESIGN.md §3).

Requests ``acquire`` a replica and hold a :class:`Lease` while they are served. A model with no
replica with room holds its requests in a bounded queue and starts one replica (one start at a
time per model, however many requests arrive). A ticker stops replicas whose keep-alive ran
out, keeps ``min_replicas`` and pre-warm windows hot, and consults the model's policy when it
has one. Replica lifecycles follow ``_state.py``; nothing moves a replica down while it has a
request in flight or a load in progress.
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
from zerostart.serve._replica import Replica
from zerostart.serve._state import State
from zerostart.serve._units import format_duration, format_size
from zerostart.weights import WeightsError

log = logging.getLogger("zerostart.serve")


class Fleet:
    """All models of one gateway. Construct it anywhere; :meth:`start` and :meth:`close` run in
    the event loop that serves requests."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._models: dict[str, Model] = {}
        limits = {dev: d.memory_budget for dev, d in config.devices.items()}
        self._budget = Budget(limits)
        for i, m in enumerate(config.models):
            where = f"models[{i}] ({m.served_name})"
            try:
                est = estimate_bytes(m)
            except (WeightsError, OSError) as e:  # OSError: a path that is neither file nor directory
                raise ConfigError(f"{where}.path: {e}") from None
            limit = limits.get(m.device)
            if limit is not None and est > limit:
                raise ConfigError(f"{where}: needs an estimated {format_size(est)} of {m.device} memory, more than "
                                  f"devices.{m.device}.memory_budget ({format_size(limit)}); raise the budget, or set "
                                  "memory_estimate if the estimate is wrong")
            policy = _make_policy(m.keep_alive_policy, f"{where}.keep_alive_policy") if m.keep_alive_policy else None
            self._models[m.served_name] = Model(m, est, policy)
        self.metrics = Metrics(self._models, self._model_gauges, self._device_gauges)
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
        for m in self._models.values():
            for r in list(m.replicas):
                if r.state is State.HOT:
                    # past the shutdown grace, requests still in flight end with the server
                    self._begin_stop(m, r, "shutdown", force=True)
        await asyncio.gather(*starts, *list(self._tasks), return_exceptions=True)
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
        """A hint for 429s: the rest of a start in progress (by the last one's duration), else 1 s."""
        if m.start_task is not None and m.last_ready_s:
            return max(1.0, m.last_ready_s - (time.monotonic() - m.start_began))
        return 1.0

    # -- starting and stopping replicas -----------------------------------------------------

    def _scale(self, m: Model) -> None:
        """Start a replica if the queue or the floor needs one (one start at a time per model)."""
        if m.start_task is not None or self._closing:
            return
        now = time.monotonic()
        if m.backoff_until > now:
            return
        live = m.live()
        if len(live) >= m.cfg.max_replicas:
            return
        needed = bool(m.waiters) and not any(r.has_capacity for r in live)
        if needed or len(live) < m.floor(now):
            m.start_began = now
            m.start_task = asyncio.create_task(self._start(m))

    async def _start(self, m: Model) -> None:
        assert self._socket_dir is not None, "Fleet.start() was not called"
        r = Replica(m.cfg, self.config.server, self._socket_dir, on_exit=self._on_worker_exit)
        r.transition(State.STARTING)
        m.replicas.append(r)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(m.cfg.start_timeout):
                await self._admit(m, r)
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
            self.metrics.observe_cold_start(m.name, r.rung, r.timeline, m.last_ready_s)
            log.info("model %s: hot after %.2f s (%s)", m.name, m.last_ready_s,
                     ", ".join(f"{p.name} {p.seconds:.2f}" for p in r.timeline.phases))
            m.start_task = None
            self._dispatch(m)
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
        if not m.live():
            self._fail_waiters(m, err)
        self._wake.set()

    async def _admit(self, m: Model, r: Replica) -> None:
        """Reserve the replica's estimated bytes on its device, stopping idle replicas of other
        models (the cheapest to bring back first) or waiting for busy ones to become idle."""
        dev, need = m.cfg.device, m.estimate
        while not self._budget.fits(dev, need):
            changed = self._memory_event
            victim = self._eviction_victim(dev, exclude=m)
            if victim is not None:
                vm, vr = victim
                log.info("model %s: evicting idle model %s from %s to make room", m.name, vm.name, dev)
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
        r.reserved_bytes = need

    def _eviction_victim(self, device: str, exclude: Model) -> tuple[Model, Replica] | None:
        now = time.monotonic()
        candidates = []
        for m in self._models.values():
            if m is exclude or m.cfg.device != device:
                continue
            live = m.live()
            spare = len(live) - m.floor(now)
            idle = sorted((r for r in live if r.state is State.HOT and r.in_flight == 0), key=lambda r: r.last_active)
            for r in idle[:max(0, spare)]:
                cost = m.last_ready_s if m.last_ready_s is not None else math.inf
                candidates.append(Candidate((m, r), cost, r.last_active))
        return choose_victim(candidates)

    def _may_free(self, device: str, exclude: Replica) -> bool:
        """Whether waiting can make room: some replica on the device is busy, loading or stopping."""
        for m in self._models.values():
            for r in m.replicas:
                if r is exclude or m.cfg.device != device or not r.reserved_bytes:
                    continue
                if r.state in (State.STARTING, State.STOPPING) or r.in_flight > 0:
                    return True
        return False

    def _begin_stop(self, m: Model, r: Replica, reason: str, *, force: bool = False) -> None:
        if r.state is not State.HOT or (r.in_flight and not force):
            raise RuntimeError(f"refusing to stop {r!r}: only idle hot replicas stop")
        r.transition(State.STOPPING)
        self._spawn(self._stop(m, r, reason))

    async def _stop(self, m: Model, r: Replica, reason: str) -> None:
        await r.stop(m.cfg.stop_timeout)
        r.transition(State.ZERO)
        self._free(m, r)
        self.metrics.stops.labels(m.name, reason).inc()
        log.info("model %s: worker pid %s stopped (%s)", m.name, r.pid, reason)
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
        """A worker exited unasked. A starting one is handled by its start; a hot one crashed."""
        m = self._models[r.name]
        if r.state is not State.HOT:
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
            if m.backoff_until > now and (m.waiters or len(m.live()) < floor):
                next_at = min(next_at, m.backoff_until)
            live = m.live()
            spare = len(live) - floor
            for r in sorted((r for r in live if r.state is State.HOT and r.in_flight == 0), key=lambda r: r.last_active):
                if spare <= 0:
                    break
                due = m.idle_due(r, now)
                if due <= now:
                    log.info("model %s: idle for %.1f s (keep-alive %s): stopping worker pid %s", m.name,
                             now - r.last_active, format_duration(m.keep_alive), r.pid)
                    self._begin_stop(m, r, "idle")
                    spare -= 1
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
        return {"models": [m.status(now) for m in self._models.values()], "devices": devices}

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
