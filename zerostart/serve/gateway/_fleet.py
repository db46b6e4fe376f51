"""The fleet: every model the gateway serves, and the request path into them (docs/design.md §3).

A request holds a :class:`Lease` on a replica of its model while it is served, taken and given
back by one context manager (``async with fleet.lease(name) as lease``; a request's lease is
entered in its resources, which ``Guard`` closes however the request ends)::

    Fleet.lease(name)
      a replica with room?             -> lease it now
      queue full?                      -> 429 (and climb: _lifecycle.py)
      else hold the request            (_queue.py), climb one replica (_lifecycle.py: wake a parked
                                        one, else hand the model to the standby worker, else start a
                                        worker, after admitting its memory: _memory.py), and lease
                                        the replica it is handed when one has room

and leaving the context gives the room back. The idle ticker (``_idle.py``) moves idle replicas
down. Replica lifecycles follow ``_state.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterable

from zerostart import __version__
from zerostart.serve._config import ConfigError, ModelConfig, ServeConfig
from zerostart.serve._status import FleetStatus
from zerostart.serve.edge import QueueFull, ShuttingDown, StartFailed, UnknownModel
from zerostart.serve.gateway import _queue
from zerostart.serve.gateway._idle import Ticker
from zerostart.serve.gateway._lifecycle import Lifecycle, cpu_threads
from zerostart.serve.gateway._memory import DeviceMemory, estimate_bytes, memory_shares
from zerostart.serve.gateway._metrics import Metrics, ModelGauges
from zerostart.serve.gateway._model import Model, cold_start_json, policy_for
from zerostart.serve.gateway._queue import Lease
from zerostart.serve.gateway._replica import Replica
from zerostart.serve.gateway._sockets import SocketDir, SocketDirInUse
from zerostart.serve.gateway._standby import Standby
from zerostart.serve.gateway._state import State
from zerostart.serve.gateway._watchdog import Watchdog
from zerostart.units import format_size
from zerostart import weights
from zerostart.weights import WeightsError

log = logging.getLogger("zerostart.serve")

_ACCOUNT_S = 2.0  # how long a shutdown waits, past the drain, for the requests it ended to give back their leases


class Fleet:
    """All models of one gateway. Construct it anywhere; :meth:`start` and :meth:`close` run in
    the event loop that serves requests."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.models: dict[str, Model] = {}
        limits = {dev: d.memory_budget for dev, d in config.devices.items()}
        shares = memory_shares(config.models, limits)
        for i, m in enumerate(config.models):
            self.models[m.served_name] = _model(m, f"models[{i}] ({m.served_name})", limits.get(m.device),
                                                shares[m.served_name])
        self.memory = DeviceMemory(limits, self.models)
        self.standby = _standby(config, self.models.values())
        self.metrics = Metrics(self.models, self._model_gauges, self.memory.gauges, lambda: self.standby.ready)
        self.lifecycle = Lifecycle(config.server, self.memory, self.metrics, self.standby, changed=self._poke,
                                   threads=cpu_threads(config))
        self.ticker = Ticker(self.models.values(), self.lifecycle)
        self.watchdog = Watchdog(self.models.values(), self.lifecycle, config.server.worker_probe_timeout)
        self.drained = asyncio.Event()  # set shutdown_timeout after the shutdown began: requests in flight end
        self._tasks: list[asyncio.Task[None]] = []
        self._sockets: SocketDir | None = None
        self._closing = False

    # -- requests ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.models)

    def model_config(self, name: str) -> ModelConfig:
        return self._model(name).cfg

    def max_model_len(self, name: str) -> int | None:
        """The context a model serves: configured, else what its latest replica reported (None before)."""
        return self._model(name).max_model_len

    @asynccontextmanager
    async def lease(self, name: str, keep_alive: float | None = None) -> AsyncIterator[Lease]:
        """A replica of ``name`` with room for one more request, held until the context is left
        (however it is left). Waits while the model starts or while its replicas are full.
        ``keep_alive``: the request's (None: the model's idle_timeout; the longest asked for
        wins). Raises :class:`ServeError` subclasses (404, 429, 503, 504). Cancelled while it
        waits, it leaves the queue (or gives back the room it was handed that instant)."""
        lease = await self._acquire(name, keep_alive)
        try:
            yield lease
        finally:
            lease.release()

    async def _acquire(self, name: str, keep_alive: float | None) -> Lease:
        if self._closing:
            raise ShuttingDown("the server is shutting down; retry on another server or once it is back")
        m = self._model(name)
        now = time.monotonic()
        self._arrived(m, now)
        if not m.live() and m.backoff_until > now:
            raise StartFailed(f"{m.last_error} (the next start is in {m.backoff_until - now:.0f} s; starts back off "
                              "after failures)", retry_after=m.backoff_until - now)
        if not m.waiters and (r := m.free_replica()) is not None:
            return Lease(m, r, r.begin(now), now, keep_alive, self.metrics, self._release)
        if len(m.waiters) >= m.cfg.max_queued:
            self.lifecycle.climb(m)
            raise QueueFull(f"model {name!r} already has {len(m.waiters)} requests waiting (max_queued "
                            f"{m.cfg.max_queued}); retry after Retry-After seconds", retry_after=_queue.retry_after(m))
        w = _queue.hold(m, now)
        self.lifecycle.climb(m)
        _queue.dispatch(m)
        replica, ticket = await _queue.wait(m, w, self._release)
        return Lease(m, replica, ticket, w.arrived, keep_alive, self.metrics, self._release)

    def _model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(self.models) or "none"
            raise UnknownModel(f"The model {name!r} does not exist on this server (served models: {known}). "
                               "GET /v1/models lists them.", param="model") from None

    def _arrived(self, m: Model, now: float) -> None:
        m.last_active = now
        m.policy.observe_arrival(m.name, now)
        self._poke()

    def _release(self, m: Model, r: Replica, ticket: int, keep_alive: float | None) -> None:
        """A request is done with ``r``: its room goes to the next held request."""
        now = time.monotonic()
        r.end(ticket)
        r.hold(now, keep_alive)
        r.last_active = m.last_active = now
        m.policy.observe_completion(m.name, now)
        _queue.dispatch(m)
        if r.in_flight == 0:
            if r.replenish_standby:
                r.replenish_standby = False
                self.standby.ensure()
            self.memory.notify()  # an idle replica is an eviction candidate
            self._poke()

    def _poke(self) -> None:
        self.ticker.poke()

    # -- the fleet's own lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        server = self.config.server
        if server.worker_transport == "unix":
            try:
                self._sockets = SocketDir.claim(server.socket_dir)
            except SocketDirInUse as e:
                raise ConfigError(f"server.socket_dir: {e}") from None
            socket_dir = self._sockets.path
        else:
            socket_dir = ""
        self.lifecycle.socket_dir = socket_dir
        self._tasks = [asyncio.create_task(self.ticker.run()), asyncio.create_task(self.watchdog.run())]
        self.standby.start(socket_dir)

    def begin_shutdown(self) -> None:
        """The server is going down (SIGTERM): new requests get 503, held ones at once; those
        in flight have ``shutdown_timeout`` to finish, then ``drained`` is set and they are
        ended (a 503, or an SSE error event and ``[DONE]``: the edge's ``Guard``)."""
        if self._closing:
            return
        self._closing = self.lifecycle.closing = True
        for m in self.models.values():
            _queue.fail(m, ShuttingDown("the server is shutting down; retry on another server or once it is back"))
            if m.start_task is not None:
                m.start_task.cancel()
        asyncio.get_running_loop().call_later(self.config.server.shutdown_timeout, self.drained.set)

    async def close(self) -> None:
        """Shut down (:meth:`begin_shutdown`, if the server did not already), wait until no
        request is in flight (at most until ``drained``), then stop every worker."""
        self.begin_shutdown()
        for task in self._tasks:
            task.cancel()
        while any(m.in_flight for m in self.models.values()) and not self.drained.is_set():
            await asyncio.sleep(0.05)
        await self._account()
        starts = [m.start_task for m in self.models.values() if m.start_task is not None]
        await asyncio.gather(*starts, *self._tasks, self.lifecycle.drain(), return_exceptions=True)
        for m in self.models.values():
            for r in list(m.replicas):
                if r.state in (State.HOT, State.PARKED):
                    # past the shutdown grace, requests still in flight end with the server
                    self.lifecycle.begin_stop(m, r, "shutdown", force=True)
        await asyncio.gather(self.standby.close(self.config.server.shutdown_timeout), self.lifecycle.drain(),
                             return_exceptions=True)
        if self._sockets is not None:
            self._sockets.close()

    async def _account(self) -> None:
        """Say what the shutdown left: every lease given back and the queues empty, or which
        models still count requests (requests ended by the drain give theirs back at once; one
        that does not is a leak)."""
        deadline = time.monotonic() + _ACCOUNT_S
        while any(m.in_flight or m.waiters for m in self.models.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        held = {m.name: (m.in_flight, len(m.waiters)) for m in self.models.values() if m.in_flight or m.waiters}
        if held:
            log.warning("shutdown: requests still hold replicas or wait (model: in flight, queued): %s; their leases "
                        "were never given back", ", ".join(f"{n}: {f}, {q}" for n, (f, q) in held.items()))
        else:
            log.info("shutdown: 0 requests in flight, 0 queued: every lease given back")

    # -- what is going on -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The JSON of ``GET /zerostart/status``, as ``serve._status.FleetStatus`` has it
        (checked against it: a field it does not declare is a bug here)."""
        now = time.monotonic()
        totals = self.metrics.totals()
        held: dict[str, dict[State, int]] = {}  # device -> bytes reserved by replicas in each state
        for m in self.models.values():
            for r in m.replicas:
                by_state = held.setdefault(m.cfg.device, {})
                by_state[r.state] = by_state.get(r.state, 0) + r.reserved_bytes
        devices = [{"device": d.device, "budget_bytes": d.budget_bytes, "reserved_bytes": d.reserved_bytes,
                    "hot_bytes": held.get(d.device, {}).get(State.HOT, 0),
                    "parked_bytes": held.get(d.device, {}).get(State.PARKED, 0)} for d in self.memory.gauges()]
        recent = [{"model": c.model, "at_unix": round(c.at_unix, 3), "ahead": c.ahead,
                   **cold_start_json(c.climb, c.ready_s, c.timeline)} for c in self.metrics.recent]
        status = {"version": __version__, "uptime_s": round(now - self.started, 3),
                  "models": [m.status(now, *totals.get(m.name, (0, 0))) for m in self.models.values()],
                  "devices": devices, "standby": self.standby.status(), "recent_cold_starts": recent}
        return FleetStatus.model_validate(status).model_dump(mode="json")

    def _model_gauges(self) -> list[ModelGauges]:
        out = []
        now = time.monotonic()
        for m in self.models.values():
            counts: dict[State, int] = {}
            for r in m.replicas:
                counts[r.state] = counts.get(r.state, 0) + 1
            by_replica = {str(r.pid): r.in_flight for r in m.replicas if r.pid is not None}
            oldest = max((r.oldest_request_s(now) for r in m.replicas), default=0.0)
            out.append(ModelGauges(m.name, m.state, counts, len(m.waiters), m.in_flight, by_replica, oldest,
                                   rung=m.rung(), device=m.cfg.device,
                                   memory_bytes=sum(r.reserved_bytes for r in m.replicas)))
        return out


def _model(cfg: ModelConfig, where: str, limit: int | None, share: int | None = None) -> Model:
    """One model of the config, with its memory estimate (checked against its device's budget),
    its share of the device and its keep-alive policy; ``ConfigError`` naming ``where`` for what
    cannot be served."""
    if (why := weights.unreachable(cfg.path)) is not None:  # found now, not by its first request
        raise ConfigError(f"{where}.path: {why}")
    if cfg.backend == "zerostart":
        try:
            est = estimate_bytes(cfg)
        except (WeightsError, OSError) as e:  # OSError: a path that is neither file nor directory
            raise ConfigError(f"{where}.path: {e}") from None
    else:
        # A foreign engine holds far more than its weights (vLLM on CPU: three processes): its
        # memory_estimate, else its share, until its first replica is measured.
        est = cfg.memory_estimate if cfg.memory_estimate is not None else share
    if est is None:
        log.info("%s: no memory estimate yet (%s); it comes from its first replica, measured "
                 "(set memory_estimate to admit it against the budget before that)", where,
                 "a remote source not in the local cache" if cfg.backend == "zerostart" else f"backend {cfg.backend}")
    elif limit is not None and est > limit:
        raise ConfigError(f"{where}: needs an estimated {format_size(est)} of {cfg.device} memory, more than "
                          f"devices.{cfg.device}.memory_budget ({format_size(limit)}); raise the budget, or set "
                          "memory_estimate if the estimate is wrong")
    try:
        policy = policy_for(cfg)
    except (ValueError, KeyError, TypeError) as e:  # PolicyError, or a policy's own check of its arguments
        raise ConfigError(f"{where}.keep_alive_policy: {e}") from None
    return Model(cfg, est, policy, share=share)


def _standby(config: ServeConfig, models: Iterable[Model]) -> Standby:
    """The standby worker, on the device most models use (sized for the largest of them)."""
    devices = [m.device for m in config.models] or ["cpu"]
    device = max(dict.fromkeys(devices), key=devices.count)
    return Standby(config.server, device=device,
                   timeout=max((m.start_timeout for m in config.models), default=300.0),
                   estimates=[m.estimate for m in models
                              if m.cfg.device == device and m.estimate and m.cfg.backend == "zerostart"])
