"""One replica: a worker process that holds one model, seen from the gateway.

The gateway binds the worker's listening socket itself (a Unix socket, or a free loopback
port) and hands the descriptor to the child, so the address is known before the worker runs
and requests can be sent as soon as it accepts. The worker's stdin is a pipe the gateway
never writes: when the gateway goes away, the worker sees end-of-file and exits.

A replica made without a model is the fleet's standby worker: it imports and initializes its
device, then waits; :meth:`Replica.hand_over` makes it a replica of a model.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import signal
import socket
import sys
import time
from collections import deque
from typing import Any, Callable

import httpx

import zerostart
from zerostart.serve._config import ModelConfig, ServerConfig
from zerostart.serve._errors import StartFailed
from zerostart.serve._state import State, check
from zerostart.serve._upstream import UpstreamPool
from zerostart.telemetry import Timeline

log = logging.getLogger("zerostart.serve")
worker_log = logging.getLogger("zerostart.serve.worker")

_LOG_TAIL_LINES = 40  # worker output kept for error messages
_READY_POLL_S = 30.0  # one long poll of the worker's ready route
_CONNECT_TIMEOUT_S = 10.0  # loopback / unix connects to a live worker are immediate
_UNIX_PATH_MAX = 107
_ids = itertools.count(1)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class ParkRefused(Exception):
    """The worker did not park (busy, or not parkable); it is still serving."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Replica:
    """A worker process for one model. ``state`` follows the table in ``_state.py``; the fleet
    drives the transitions, this class does the process work."""

    def __init__(self, model: ModelConfig | None, server: ServerConfig, socket_dir: str,
                 on_exit: Callable[["Replica"], None], *, standby_device: str | None = None,
                 standby_reserve: int = 0) -> None:
        self.id = next(_ids)
        self.model = model
        self.name = model.served_name if model is not None else "standby"
        self.standby_device = standby_device  # a standby worker: the device it initializes
        self.standby_reserve = standby_reserve  # and the host memory it faults in for the arena (CPU)
        self.parkable = False  # load so that it can be parked (the fleet decides)
        self._server = server
        self._socket_dir = socket_dir
        self.on_exit = on_exit  # the fleet swaps it when a standby worker becomes a replica
        self.state = State.ZERO
        self.in_flight = 0
        self.last_active = time.monotonic()
        self.reserved_bytes = 0
        self.pid: int | None = None
        self.address: str | None = None  # "unix:/path" or "http://host:port"
        self.client: httpx.AsyncClient | None = None  # control routes (ready, phases)
        self.upstream: UpstreamPool | None = None  # the proxied OpenAI requests
        self.timeline = Timeline(label=f"{self.name} cold start")
        self.rung = "source"  # the rung this replica last climbed from (source, image, standby+..., parked)
        self.info: dict[str, Any] = {}  # the worker's last ready report (sizes, image, parkable)
        self.standby_record: dict[str, Any] | None = None  # a standby worker's own start, before the hand-over
        self.spawned_at = 0.0  # monotonic
        self.replenish_standby = False  # taken from the standby: prepare the next spare once idle
        self.ready_at: float | None = None  # monotonic
        self.first_token_recorded = False
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self._expected_exit = False
        self._proc: asyncio.subprocess.Process | None = None
        self._socket_path: str | None = None
        self._tcp_address: tuple[str, int] = ("", 0)
        self._tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        self._tasks: list[asyncio.Task[Any]] = []
        self._phase = "spawn"
        self.image: dict[str, Any] | None = None  # what the worker did with ready images

    def __repr__(self) -> str:
        return f"<Replica {self.name}#{self.id} {self.state.value} pid={self.pid} in_flight={self.in_flight}>"

    def transition(self, dst: State) -> None:
        check(self.state, dst, f"{self.name} replica #{self.id}")
        log.debug("%s replica #%d: %s -> %s", self.name, self.id, self.state.value, dst.value)
        self.state = dst

    @property
    def has_capacity(self) -> bool:
        return self.state is State.HOT and self.in_flight < self.model.max_concurrency

    # -- starting ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the worker and return once it has loaded the model and serves requests.
        Raises :class:`StartFailed` naming the cause; the caller enforces the start timeout."""
        spawn_unix = await self._spawn()
        await self._await_ready("while loading")
        await self._fetch_phases(spawn_unix, spawned=True)

    async def start_standby(self) -> None:
        """Spawn a standby worker and return once it has imported and initialized its device."""
        spawn_unix = await self._spawn()
        await self._await_ready("while preparing as a standby worker", want="standby")
        body = await self._phases_body()
        shift = float(body["origin_unix"]) - spawn_unix
        first = min((float(p["start_s"]) for p in body["phases"]), default=0.0)
        tl = Timeline(label="standby worker")
        tl.add_relative("spawn", 0.0, max(0.0, shift + first))
        tl.merge({"phases": body["phases"]}, shift=shift)
        self.standby_record = {"pid": self.pid, "device": self.standby_device, "phases": tl.to_dict()["phases"]}

    async def hand_over(self, model: ModelConfig, parkable: bool) -> None:
        """Make this standby worker a replica of ``model``: it loads it with its imports and
        device init already done. Raises :class:`StartFailed` like :meth:`start`."""
        self.assign(model, parkable)
        assert self.client is not None
        if self.standby_record is not None:
            self.standby_record["waited_s"] = round(time.monotonic() - self.spawned_at, 3)
        begin_unix = time.time()
        self.timeline = Timeline(label=f"{self.name} cold start")
        body = {"model": model.path, "name": model.served_name, "device": model.device, "dtype": model.dtype,
                "images": model.images, "parkable": parkable,
                "engine_options": {k: v for k, v in (("max_model_len", model.max_model_len),
                                                     ("kv_cache_bytes", model.kv_cache_bytes)) if v is not None}}
        try:
            r = await self.client.post("/zerostart/load", json=body, timeout=_CONNECT_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise StartFailed(f"the standby worker (pid {self.pid}) did not take model {self.name!r}: {e!r}",
                              cause="exit") from None
        if r.status_code != 202:
            raise StartFailed(f"the standby worker (pid {self.pid}) refused model {self.name!r}: HTTP {r.status_code} "
                              f"{r.text[:300]}", cause="internal")
        await self._await_ready("while loading")
        await self._fetch_phases(begin_unix, spawned=False)

    def assign(self, model: ModelConfig, parkable: bool) -> None:
        """This standby worker now belongs to ``model`` (before :meth:`hand_over` loads it)."""
        self.model, self.name, self.parkable = model, model.served_name, parkable

    async def _spawn(self) -> float:
        try:
            sock = self._listen()
        except OSError as e:
            raise StartFailed(f"could not open a socket for model {self.name!r}'s worker ({e}); check "
                              "server.socket_dir / server.worker_host", cause="spawn") from None
        spawn_unix = time.time()
        self.spawned_at = time.monotonic()
        self.timeline = Timeline(label=f"{self.name} cold start")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._command(sock.fileno()), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, pass_fds=(sock.fileno(),), env=self._env(),
                start_new_session=True)  # ^C at the terminal reaches the gateway, which stops workers in order
        except OSError as e:
            raise StartFailed(f"could not start a worker process for model {self.name!r}: {e}", cause="spawn") from None
        finally:
            sock.close()  # the worker holds its own copy; ours would keep dead workers connectable
        self.pid = self._proc.pid
        self._tasks = [asyncio.create_task(self._read_output()), asyncio.create_task(self._watch_exit())]
        self.client = self._make_client()
        if self._socket_path is not None:
            self.upstream = UpstreamPool(uds=self._socket_path, connect_timeout=_CONNECT_TIMEOUT_S)
        else:
            host, port = self._tcp_address
            self.upstream = UpstreamPool(host=host, port=port, connect_timeout=_CONNECT_TIMEOUT_S)
        if self.model is None:
            log.info("standby worker: starting pid %d on %s (%s)", self.pid, self.standby_device, self.address)
        else:
            log.info("model %s: starting worker pid %d (%s)", self.name, self.pid, self.address)
        return spawn_unix

    async def _await_ready(self, when: str, want: str = "ready") -> None:
        ready = asyncio.create_task(self._wait_ready(want))
        exited = asyncio.create_task(self.exited.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not ready.done():
                ready.cancel()
        if not ready.done() or ready.cancelled():
            raise StartFailed(self._exit_message(when), cause="exit")
        exc = ready.exception()
        if isinstance(exc, StartFailed):
            raise exc
        if exc is not None:
            raise StartFailed(f"the worker for model {self.name!r} answered its ready route unexpectedly: {exc!r}", cause="exit")

    async def _wait_ready(self, want: str = "ready") -> None:
        assert self.client is not None
        while True:
            try:
                r = await self.client.get("/zerostart/ready", params={"wait": _READY_POLL_S},
                                          timeout=httpx.Timeout(_READY_POLL_S + 5.0, connect=_CONNECT_TIMEOUT_S))
            except httpx.TransportError:
                if self.exited.is_set():
                    raise StartFailed(self._exit_message("while loading"), cause="exit") from None
                await asyncio.sleep(0.05)
                continue
            body = r.json()
            self._phase = str(body.get("phase") or self._phase)
            if r.status_code == 200 and body.get("state") == want:
                if want == "ready":
                    self.info = body
                    self.rung = str(body.get("rung") or "source")
                return
            if body.get("state") == "failed":
                where = self.model.path if self.model is not None else f"a standby worker on {self.standby_device}"
                raise StartFailed(f"model {self.name!r} failed to load from {where}: {body.get('error')}")
            if r.status_code == 200:
                raise StartFailed(f"the worker for model {self.name!r} is {body.get('state')!r}, expected {want!r}",
                                  cause="internal")

    async def _phases_body(self) -> dict[str, Any]:
        assert self.client is not None
        try:
            r = await self.client.get("/zerostart/phases", timeout=_CONNECT_TIMEOUT_S)
            r.raise_for_status()
            body = r.json()
            float(body["origin_unix"]), list(body["phases"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise StartFailed(f"the worker for model {self.name!r} did not report its load phases ({e!r})",
                              cause="exit") from None
        return body

    async def _fetch_phases(self, begin_unix: float, *, spawned: bool) -> None:
        """This cold start's phases from the worker, on a timeline that begins at ``begin_unix``
        (the spawn, the hand-over to a standby worker, or the wake). The worker's phases are
        relative to its own origin (the first line it ran); only those after the worker was
        asked for this cold start belong to it (a standby's imports happened before)."""
        body = await self._phases_body()
        shift = float(body["origin_unix"]) - begin_unix
        requested = float(body.get("requested_s") or 0.0)
        phases = [p for p in body["phases"] if not requested or float(p["end_s"]) > requested]
        if spawned:
            # Spawn ends where the worker's first phase begins (its HTTP server is up by then).
            first = min((float(p["start_s"]) for p in phases), default=0.0)
            self.timeline.add_relative("spawn", 0.0, max(0.0, shift + first))
        self.timeline.merge({"phases": phases}, shift=shift)
        self.rung = str(body.get("rung") or self.rung)
        self.image = body.get("image")

    # -- parking ----------------------------------------------------------------------------

    async def park(self, timeout: float) -> dict[str, Any]:
        """Ask the worker to park. Raises :class:`ParkRefused` (it is still hot) or
        ``RuntimeError`` (the park failed or the worker is unreachable: stop it)."""
        assert self.client is not None
        try:
            r = await self.client.post("/zerostart/park", timeout=httpx.Timeout(timeout, connect=_CONNECT_TIMEOUT_S))
            body = r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise RuntimeError(f"parking the worker for model {self.name!r} (pid {self.pid}) failed: {e!r}") from None
        if r.status_code == 409:
            err = body.get("error", {})
            raise ParkRefused(str(err.get("message")), str(err.get("code")))
        if r.status_code != 200:
            raise RuntimeError(str(body.get("error", {}).get("message", f"HTTP {r.status_code}")))
        return body

    async def wake(self, timeout: float) -> dict[str, Any]:
        """Wake a parked worker; its ``wake`` phase becomes this replica's cold-start timeline.
        Raises ``RuntimeError`` when the wake fails (stop the worker then)."""
        assert self.client is not None
        begin_unix = time.time()
        self.timeline = Timeline(label=f"{self.name} cold start")
        try:
            r = await self.client.post("/zerostart/wake", timeout=httpx.Timeout(timeout, connect=_CONNECT_TIMEOUT_S))
            body = r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise RuntimeError(f"waking the worker for model {self.name!r} (pid {self.pid}) failed: {e!r}") from None
        if r.status_code != 200:
            raise RuntimeError(str(body.get("error", {}).get("message", f"HTTP {r.status_code}")))
        try:
            await self._fetch_phases(begin_unix, spawned=False)
        except StartFailed as e:
            raise RuntimeError(e.message) from None
        self.rung = "parked"
        return body

    async def current_phase(self) -> str:
        """What the worker is doing now (for timeout messages); the last known phase if it
        does not answer at once."""
        if self.client is not None and not self.exited.is_set():
            try:
                r = await self.client.get("/zerostart/ready", params={"wait": 0}, timeout=1.0)
                self._phase = str(r.json().get("phase") or self._phase)
            except (httpx.HTTPError, ValueError):
                pass
        return self._phase

    # -- stopping ---------------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is gone."""
        self._expected_exit = True
        if self._proc is not None and self._proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), timeout)
            except TimeoutError:
                log.warning("model %s: worker pid %s did not exit within %g s of SIGTERM; killing it",
                            self.name, self.pid, timeout)
                self._signal(signal.SIGKILL)
                await self.exited.wait()
        await self.close()

    async def kill(self) -> None:
        self._expected_exit = True
        if self._proc is not None and self._proc.returncode is None:
            self._signal(signal.SIGKILL)
            await self.exited.wait()
        await self.close()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.upstream is not None:
            await self.upstream.aclose()
        for t in self._tasks:
            if not t.done():
                await asyncio.wait({t}, timeout=1.0)
        self._unlink_socket()

    def _signal(self, sig: signal.Signals) -> None:
        try:
            assert self._proc is not None
            self._proc.send_signal(sig)
        except ProcessLookupError:
            pass

    # -- process plumbing -------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        if self._server.worker_transport == "unix":
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)[:40]
            path = os.path.join(self._socket_dir, f"{safe}-{self.id}.sock")
            if len(path) > _UNIX_PATH_MAX:
                raise StartFailed(f"unix socket path {path} is longer than {_UNIX_PATH_MAX} bytes; "
                                  "set server.socket_dir to a shorter directory", cause="spawn")
            if os.path.exists(path):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            self._socket_path = path
            self.address = f"unix:{path}"
        else:
            # IPPROTO_TCP, so asyncio turns Nagle off on the worker's connections
            sock = socket.socket(socket.AF_INET6 if ":" in self._server.worker_host else socket.AF_INET,
                                 socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.bind((self._server.worker_host, 0))
            host, port = sock.getsockname()[:2]
            self._tcp_address = (host, port)
            self.address = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        sock.listen(max(128, self.model.max_concurrency * 2 if self.model is not None else 0))
        sock.set_inheritable(True)
        return sock

    def _make_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        timeout = httpx.Timeout(None, connect=_CONNECT_TIMEOUT_S)  # generations may take long
        if self._socket_path is not None:
            transport = httpx.AsyncHTTPTransport(uds=self._socket_path, limits=limits)
            return httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=timeout)
        assert self.address is not None
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(limits=limits), base_url=self.address,
                                 timeout=timeout)

    def _command(self, fd: int) -> list[str]:
        cmd = [sys.executable, "-m", "zerostart.serve._worker", "--fd", str(fd)]
        m = self.model
        if m is None:
            cmd += ["--standby", "--device", self.standby_device or "cpu"]
            if self.standby_reserve:
                cmd += ["--reserve", str(self.standby_reserve)]
            return cmd
        cmd += ["--model", m.path, "--name", self.name, "--device", m.device, "--images", m.images]
        if self.parkable:
            cmd.append("--parkable")
        if m.dtype:
            cmd += ["--dtype", m.dtype]
        if m.max_model_len:
            cmd += ["--max-model-len", str(m.max_model_len)]
        if m.kv_cache_bytes:
            cmd += ["--kv-cache-bytes", str(m.kv_cache_bytes)]
        return cmd

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.model is not None:
            env.update(self.model.env)
        root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while True:
            try:
                line = await self._proc.stdout.readline()
            except ValueError:  # a line over the stream limit: keep what fits
                line = b"<line too long>\n"
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self._tail.append(text)
            worker_log.debug("[%s pid %s] %s", self.name, self.pid, text)

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        self.exit_code = await self._proc.wait()
        # let the output reader drain the last lines (a traceback) before anyone reports them
        await asyncio.wait({self._tasks[0]}, timeout=1.0)
        self.exited.set()
        self._unlink_socket()
        if not self._expected_exit:
            log.warning("model %s: worker pid %s exited unexpectedly (%s)", self.name, self.pid,
                        describe_exit(self.exit_code))
            self.on_exit(self)

    def _unlink_socket(self) -> None:
        if self._socket_path and os.path.exists(self._socket_path):
            try:
                os.unlink(self._socket_path)
            except OSError:
                pass

    def _exit_message(self, when: str) -> str:
        return (f"the worker for model {self.name!r} (pid {self.pid}) exited with {describe_exit(self.exit_code)} "
                f"{when}{self._last_words()}")

    def _last_words(self) -> str:
        lines = [x for x in self._tail if x.strip()]
        if not lines:
            return ""
        # a traceback's last line names the error; the line before often names the file
        return "; its last output: " + " | ".join(lines[-3:])

    def crash_message(self) -> str:
        """For requests that were in flight when the worker died."""
        return (self._exit_message("while serving this request")
                + ". Retry: the next request starts a new worker.")
