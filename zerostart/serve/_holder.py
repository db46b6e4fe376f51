"""What a worker process holds: one model's engine, and where that model is in the worker's
life. The HTTP routes in ``_worker.py`` drive it; loads, parks and wakes run on threads so the
server keeps answering meanwhile.

A worker's states (the gateway's replica states are in ``_state.py``)::

    starting -> loading    a plain worker: imports, then the load, right away
    starting -> standby    --standby: torch and the engine imported, the device initialized
    standby  -> loading    POST /zerostart/load names the model
    loading  -> ready      the engine is loaded and warmed up: requests are served
    loading  -> failed     the load failed (the error is reported; the gateway stops us)
    ready    -> parking    POST /zerostart/park with nothing in flight
    parking  -> parked     weights in host RAM, KV cache dropped; the process and graphs stay
    parking  -> ready      refused (a request still running, or not parkable): nothing changed
    parking  -> failed     the park itself failed
    parked   -> waking     POST /zerostart/wake
    waking   -> ready      weights back at the same addresses
    waking   -> failed     the wake failed
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from zerostart.names import ImageMode
from zerostart.serve import _images
from zerostart.serve._images import ImageReport
from zerostart.telemetry import Timeline

log = logging.getLogger("zerostart.serve.worker")

SETTLED = frozenset({"standby", "ready", "parked", "failed"})  # states a long poll of /zerostart/ready waits for
_ENGINE_DRAIN_S = 2.0  # a park waits this long for sequences the engine is still finishing (cancelled streams)
_IDLE_POLL_S = 0.05  # the image writer's check for an idle worker


class NotParkable(RuntimeError):
    """This worker's model cannot be parked (the message says why)."""


class Busy(RuntimeError):
    """Requests are in flight: nothing was parked."""


@dataclass
class LoadSpec:
    """What to load, and how (the worker's command line, or a standby's load request)."""

    model: str
    name: str
    device: str = "cpu"
    dtype: str | None = None
    images: ImageMode = "off"
    parkable: bool = False
    engine_options: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields


@dataclass
class _InFlight:
    method: str
    path: str
    started: float  # monotonic


class Holder:
    def __init__(self, origin: float, origin_unix: float) -> None:
        self.origin_unix = origin_unix
        self.timeline = Timeline(origin=origin, label="worker")  # the load (and a standby's preparation)
        self.current = self.timeline  # the latest cold start: the load, or the latest wake
        self.state = "starting"
        self.phase = "import"
        self.error: str | None = None
        self.spec: LoadSpec | None = None
        self.rung: str | None = None
        self.requested_s = 0.0  # when the latest cold start was asked for (seconds from origin)
        self.standby_device: str | None = None  # set once a standby worker initialized its device
        self.engine: Any = None
        self.routes: Any = None  # the OpenAI routes over the engine
        self.image = ImageReport()
        self.parkable = False
        self.parkable_error: str | None = None
        self.load_record: dict[str, Any] | None = None  # the load's timeline, once a wake replaced it
        self.in_flight: dict[int, _InFlight] = {}  # OpenAI requests being served, by id
        self.paused = False  # new requests wait (CUDA: while the image writer copies the weights to host)
        self.closing = False  # the worker is shutting down
        self._ids = 0
        self._fp: Any = None
        self._parking: Any = None
        self._weights_lock = threading.Lock()  # held while the weights are read for an image, or parked
        self._writer: threading.Thread | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    # -- state and waiting ------------------------------------------------------------------

    def _set(self, state: str, phase: str | None = None) -> None:
        with self._lock:
            self.state = state
            self.phase = phase or state
            waiters, self._waiters = self._waiters, []
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    async def wait_settled(self, timeout: float) -> None:
        """Return once the state is one of ``SETTLED`` or ``timeout`` seconds passed."""
        deadline = time.monotonic() + max(0.0, timeout)
        while self.state not in SETTLED:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ev = asyncio.Event()
            with self._lock:
                if self.state in SETTLED:
                    return
                self._waiters.append((asyncio.get_running_loop(), ev))
            try:
                await asyncio.wait_for(ev.wait(), left)
            except TimeoutError:
                return

    def begin_request(self, method: str, path: str) -> int:
        self._ids += 1
        self.in_flight[self._ids] = _InFlight(method, path, time.monotonic())
        return self._ids

    def end_request(self, rid: int) -> None:
        self.in_flight.pop(rid, None)

    def in_flight_json(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"id": rid, "method": r.method, "path": r.path, "age_s": round(now - r.started, 3)}
                for rid, r in sorted(self.in_flight.items())]

    # -- starting ---------------------------------------------------------------------------

    def start(self, spec: LoadSpec) -> None:
        """A plain worker: import, then load ``spec``, on a background thread."""
        self.spec = spec
        self._set("loading", "import")
        threading.Thread(target=self._run, args=(spec, False), name="zerostart-loader", daemon=True).start()

    def start_standby(self, device: str, reserve: int = 0) -> None:
        """A standby worker: import and initialize ``device`` (and on CPU fault in ``reserve``
        bytes of host memory for the arena), then wait for :meth:`load`."""
        threading.Thread(target=self._prepare_standby, args=(device, reserve), name="zerostart-standby",
                         daemon=True).start()

    def load(self, spec: LoadSpec) -> None:
        """A standby worker's load request (call from the event loop; the state must be standby)."""
        if self.state != "standby":
            raise RuntimeError(f"this worker is {self.state}, not a waiting standby worker")
        self.spec = spec
        self.requested_s = self.timeline.now()
        self._set("loading", "load")
        threading.Thread(target=self._run, args=(spec, True), name="zerostart-loader", daemon=True).start()

    def _import(self) -> None:
        t0 = time.perf_counter()
        from zerostart.engine import Engine  # noqa: F401  torch and the engine: the fixed cost of a cold start
        import zerostart.serve._openai  # noqa: F401  the request path, so the first request pays for none of it
        import zerostart.snapshot  # noqa: F401  parking and ready images
        self.timeline.add("import", t0, time.perf_counter())

    def _prepare_standby(self, device: str, reserve: int = 0) -> None:
        try:
            self._import()
            self._set("starting", "device_init")
            from zerostart.engine import device_for

            t0 = time.perf_counter()
            dev = device_for(device)
            if dev.type == "cuda":
                from zerostart.snapshot import VmmUnavailable, require_vmm

                try:  # the VMM driver bindings a parkable load will use
                    require_vmm()
                except VmmUnavailable:
                    pass  # reported by the load that needs them
            self.timeline.add("device_init", t0, time.perf_counter(), device=str(dev))
            if reserve and dev.type == "cpu":
                from zerostart import weights

                t0 = time.perf_counter()
                weights.reserve_host(reserve)
                self.timeline.add("reserve", t0, time.perf_counter(), bytes=weights.reserved_host())
            elif reserve:
                log.warning("standby worker on %s: a host memory reserve serves CPU arenas only; none made", dev)
            self.standby_device = str(dev)
            self._set("standby")
        except BaseException as e:  # noqa: BLE001 - reported through /zerostart/ready
            self._fail(e)

    def _run(self, spec: LoadSpec, standby: bool) -> None:
        try:
            if not standby:
                self._import()
            self._set("loading", "load")
            engine, rung = self._load(spec)
            self._set("loading", "engine_start")
            engine.start()
            from zerostart.serve._openai import OpenAIRoutes

            self.routes = OpenAIRoutes(engine, spec.name)
            self.engine = engine
            self.rung = ("standby+" if standby else "") + rung
            if spec.images == "write" and rung == "source":
                self.image.status = "queued"
                self._writer = threading.Thread(target=self._write_image, name="zerostart-image-writer", daemon=True)
            self._set("ready")
            if self._writer is not None:
                self._writer.start()
        except BaseException as e:  # noqa: BLE001 - reported to the gateway, which stops this process
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        self._set("failed", self.phase)

    # -- loading ----------------------------------------------------------------------------

    def _load(self, spec: LoadSpec) -> tuple[Any, str]:
        """The engine, from the ready image when there is a good one, else from the source."""
        import torch

        from zerostart import weights
        from zerostart.engine import EngineConfig, EngineError

        try:
            config = EngineConfig(**spec.engine_options)
        except TypeError as e:
            raise EngineError(f"engine_options: {e}") from None
        allocator = None
        device_type = torch.device(spec.device).type
        self.parkable = device_type != "cuda"  # CPU memory can always be parked
        if spec.parkable and device_type == "cuda":
            from zerostart.snapshot import VmmUnavailable, require_vmm, vmm_allocator

            try:
                require_vmm()
                allocator, self.parkable = vmm_allocator, True
            except VmmUnavailable as e:
                self.parkable_error = f"parking needs CUDA VMM memory, which is unavailable: {e}"
                log.warning("model %s: loading without parkable memory: %s", spec.name, e)
        self.image = ImageReport(mode=spec.images, status="off")
        if _images.is_image(spec.model):
            self.image.path, self.image.status = spec.model, "is_source"
            return self._from_pretrained(spec.model, spec, config, allocator), "image"
        if spec.images != "off":
            try:
                path, self._fp = _images.locate(spec.model, spec.device, spec.dtype)
            except (EngineError, weights.WeightsError, weights.SourceError, OSError, ValueError) as e:
                self.image.status, self.image.error = "unavailable", str(e)
                log.warning("model %s: the image store could not be consulted (%s); loading the source", spec.name, e)
            else:
                self.image.path = path
                why = _images.check(path, self._fp)
                if why == "missing":
                    self.image.status = "missing"
                elif why is not None:
                    self._reject(spec, path, why, time.perf_counter())
                else:
                    t0 = time.perf_counter()
                    try:
                        engine = self._from_pretrained(path, spec, config, allocator)
                    except (ValueError, OSError, RuntimeError) as e:
                        # EngineError and WeightsError (checksums, truncation, an incompatible
                        # manifest) are ValueErrors; I/O errors are OSErrors. Whatever it was, the
                        # image is not served from: the source is loaded instead.
                        self._reject(spec, path, str(e), t0)
                        gc.collect()  # the failed attempt's memory, before the source's load
                    else:
                        self.image.status = "used"
                        return engine, "image"
        return self._from_pretrained(spec.model, spec, config, allocator), "source"

    def _reject(self, spec: LoadSpec, path: str, why: str, t0: float) -> None:
        self.image.status, self.image.rejected = "rejected", why
        self.timeline.add("rejected_image", t0, time.perf_counter(), path=path, reason=why)
        log.warning("model %s: not serving from the ready image %s: %s; loading the source %s instead",
                    spec.name, path, why, spec.model)

    def _from_pretrained(self, path: str, spec: LoadSpec, config: Any, allocator: Any) -> Any:
        from zerostart.engine import Engine

        tl = Timeline(origin=self.timeline.origin)
        engine = Engine.from_pretrained(path, device=spec.device, dtype=spec.dtype, config=config, timeline=tl,
                                        allocator=allocator)
        # The engine times its own import and device init; ours (measured around the whole
        # import, or the standby's preparation) stand for them.
        have = {p.name for p in self.timeline.phases}
        for p in tl.phases:
            if p.name == "import" and "import" in have:
                continue
            if p.name == "device_init" and self.standby_device == str(engine.device):
                continue
            self.timeline.phases.append(p)
        return engine

    # -- ready images -----------------------------------------------------------------------

    def _write_image(self) -> None:
        """After a load from the source: write the ready image once the worker is idle, at low
        priority. Requests keep being served meanwhile (the weights are only read). On CUDA the
        weights are first copied to host memory while new requests wait (no device work from
        this thread can then meet a CUDA graph capture), and the file is written from there."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (OSError, AttributeError):
            pass
        name = self.spec.name if self.spec else "?"
        while True:
            while self.state != "ready" or self.in_flight or self._engine_busy():
                if self.state == "failed" or self.closing:
                    return
                time.sleep(_IDLE_POLL_S)
            if self.closing:
                return  # shutting down before it began: the next start from the source writes it
            t0 = time.perf_counter()
            host = None
            try:
                with self._weights_lock:  # a park waits for the weights to be read
                    if self.state != "ready":
                        continue  # being parked: wait for the wake
                    self.image.status = "writing"
                    if self.image.rejected is not None and self.image.path:
                        _images.discard(self.image.path)  # the rejected image it replaces
                    if self.engine.device.type == "cuda":
                        host = self._host_copy()
                    else:
                        self.image.path = _images.write(self.engine, self.image.path, self._fp)
                if host is not None:
                    self.image.path = _images.write(self.engine, self.image.path, self._fp, host_tensors=host)
            except Exception as e:  # noqa: BLE001 - an image is an optimization: report, keep serving
                self.image.status, self.image.error = "write_failed", f"{type(e).__name__}: {e}"
                log.warning("model %s: writing its ready image failed: %s", name, e)
            else:
                self.image.status, self.image.error = "written", None
                log.warning("model %s: wrote its ready image %s", name, self.image.path)
            self.image.write_s = time.perf_counter() - t0
            return

    def _host_copy(self) -> dict[str, Any]:
        """The weights as host tensors (views of one copy of the arena, at the same relative
        offsets), copied while new requests wait for it."""
        import torch

        self._pause(True)
        try:
            deadline = time.perf_counter() + _ENGINE_DRAIN_S
            while (self.in_flight or self._engine_busy()) and time.perf_counter() < deadline:
                time.sleep(0.01)
            storage = self.engine.weights_storage
            host = torch.empty(storage.shape, dtype=storage.dtype, device="cpu")  # pageable: no allocation a capture forbids
            host.copy_(storage)
        finally:
            self._pause(False)
        base, out = storage.data_ptr(), {}
        for name, t in self.engine.arena.tensors.items():
            off, n = t.data_ptr() - base, t.numel() * t.element_size()
            out[name] = host[off:off + n].view(t.dtype).view(t.shape)
        return out

    def _pause(self, paused: bool) -> None:
        with self._lock:
            self.paused = paused
            waiters, self._waiters = (self._waiters, []) if not paused else ([], self._waiters)
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    async def wait_unpaused(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.paused and time.monotonic() < deadline:
            ev = asyncio.Event()
            with self._lock:
                if not self.paused:
                    return
                self._waiters.append((asyncio.get_running_loop(), ev))
            try:
                await asyncio.wait_for(ev.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return

    def close(self, timeout: float) -> None:
        """On shutdown: an image write not yet begun is dropped; one under way may take up to
        ``timeout`` seconds to finish (else its temporary directory is swept by a later writer)."""
        self.closing = True
        if self._writer is not None and self._writer.is_alive():
            self._writer.join(timeout)

    def _engine_busy(self) -> bool:
        s = self.engine.stats()
        return bool(s.get("running", 0) + s.get("waiting", 0))

    # -- parking ----------------------------------------------------------------------------

    def begin_park(self) -> None:
        """Called from the event loop: refuse (Busy / NotParkable) or move to ``parking``."""
        if self.state != "ready":
            raise NotParkable(f"the worker is {self.state}, not ready")
        if self.in_flight:
            raise Busy(f"{len(self.in_flight)} request(s) in flight")
        if not self.parkable:
            raise NotParkable(self.parkable_error or "this model was not loaded parkable (start the worker with --parkable)")
        self._set("parking")

    def park(self) -> dict[str, Any]:
        """Run on a thread after :meth:`begin_park`. Back to ``ready`` if refused (Busy,
        NotParkable); ``failed`` if the park itself fails."""
        t0 = time.perf_counter()
        try:
            with self._weights_lock:  # an image being written reads the weights: let it finish
                waited = time.perf_counter() - t0
                deadline = time.perf_counter() + _ENGINE_DRAIN_S
                while self._engine_busy() and time.perf_counter() < deadline:
                    time.sleep(0.01)
                if self._engine_busy():
                    s = self.engine.stats()
                    raise Busy(f"the engine still has {s.get('running', 0)} running and {s.get('waiting', 0)} "
                               "waiting sequence(s)")
                if self._parking is None:
                    from zerostart.snapshot import EngineParking

                    try:
                        self._parking = EngineParking(self.engine)
                    except ValueError as e:
                        raise NotParkable(str(e)) from None
                stats = self._parking.park()
        except (Busy, NotParkable):
            self._set("ready")
            raise
        except BaseException as e:
            self._fail(e)
            raise
        self._set("parked")
        return {"state": "parked", "changed": True, "park_s": round(stats.park_s, 6), "bytes": stats.bytes,
                "gbps": round(stats.park_gbps, 4), "kv_bytes": self._parking.kv.nbytes, "waited_s": round(waited, 6)}

    def begin_wake(self) -> float:
        if self.state != "parked":
            raise NotParkable(f"the worker is {self.state}, not parked")
        self._set("waking")
        return time.perf_counter()

    def wake(self, requested: float) -> dict[str, Any]:
        """Run on a thread after :meth:`begin_wake`; records the ``wake`` phase as this worker's
        latest cold start."""
        t0 = time.perf_counter()
        try:
            stats = self._parking.wake()
        except BaseException as e:
            self._fail(e)
            raise
        t1 = time.perf_counter()
        if self.load_record is None:
            self.load_record = {"rung": self.rung, "requested_s": round(self.requested_s, 6),
                                "phases": self.timeline.to_dict()["phases"]}
        tl = Timeline(origin=self.timeline.origin, label="worker wake")
        tl.add("wake", t0, t1, bytes=stats.bytes, kv_bytes=self._parking.kv.nbytes)
        self.current, self.rung, self.requested_s = tl, "parked", requested - self.timeline.origin
        self._set("ready")
        return {"state": "ready", "changed": True, "wake_s": round(stats.wake_s, 6), "bytes": stats.bytes,
                "gbps": round(stats.wake_gbps, 4)}

    # -- reports ----------------------------------------------------------------------------

    def ready_json(self, pid: int) -> dict[str, Any]:
        if self.state == "standby":
            return {"state": "standby", "phase": "standby", "pid": pid, "device": self.standby_device}
        e = self.engine
        if self.state in ("ready", "parked", "parking", "waking") and e is not None:
            d: dict[str, Any] = {
                "state": self.state, "phase": self.phase, "model": self.spec.name if self.spec else None,
                "source": self.spec.model if self.spec else None, "pid": pid, "device": str(e.device),
                "dtype": str(e.dtype).removeprefix("torch."), "max_model_len": e.max_model_len, "rung": self.rung,
                "parkable": self.parkable, "parked": self.state == "parked",
                "weights_bytes": int(e.weights_storage.numel() * e.weights_storage.element_size()),
                "kv_bytes": int(e.kv.nbytes), "image": self.image.to_dict()}
            if self.parkable_error:
                d["parkable_error"] = self.parkable_error
            return d
        d = {"state": self.state, "phase": self.phase}
        if self.state == "failed":
            d["error"] = self.error
        return d

    def phases_json(self) -> dict[str, Any]:
        tl = self.current.to_dict()
        return {"origin_unix": self.origin_unix, "state": self.state, "rung": self.rung,
                "requested_s": round(self.requested_s, 6), "phases": tl["phases"], "timeline": tl,
                "image": self.image.to_dict(), "load": self.load_record}
