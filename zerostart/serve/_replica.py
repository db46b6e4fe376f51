"""One replica: a worker process that holds one model, seen from the gateway.

The gateway binds the worker's listening socket itself (a Unix socket, or a free loopback
port) and hands the descriptor to the child, so the address is known before the worker runs
and requests can be sent as soon as it accepts. The worker's stdin is a pipe the gateway
never writes: when the gateway goes away, the worker sees end-of-file and exits.
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


class Replica:
    """A worker process for one model. ``state`` follows the table in ``_state.py``; the fleet
    drives the transitions, this class does the process work."""

    def __init__(self, model: ModelConfig, server: ServerConfig, socket_dir: str,
                 on_exit: Callable[["Replica"], None]) -> None:
        self.id = next(_ids)
        self.model = model
        self.name = model.served_name
        self._server = server
        self._socket_dir = socket_dir
        self._on_exit = on_exit
        self.state = State.ZERO
        self.in_flight = 0
        self.last_active = time.monotonic()
        self.reserved_bytes = 0
        self.pid: int | None = None
        self.address: str | None = None  # "unix:/path" or "http://host:port"
        self.client: httpx.AsyncClient | None = None  # control routes (ready, phases)
        self.upstream: UpstreamPool | None = None  # the proxied OpenAI requests
        self.timeline = Timeline(label=f"{self.name} cold start")
        self.rung = "zero"  # the rung this replica climbed from
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
        try:
            sock = self._listen()
        except OSError as e:
            raise StartFailed(f"could not open a socket for model {self.name!r}'s worker ({e}); check "
                              "server.socket_dir / server.worker_host", cause="spawn") from None
        spawn_unix = time.time()
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
        log.info("model %s: starting worker pid %d (%s)", self.name, self.pid, self.address)

        ready = asyncio.create_task(self._wait_ready())
        exited = asyncio.create_task(self.exited.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not ready.done():
                ready.cancel()
        if not ready.done() or ready.cancelled():
            raise StartFailed(self._exit_message("while loading"), cause="exit")
        exc = ready.exception()
        if isinstance(exc, StartFailed):
            raise exc
        if exc is not None:
            raise StartFailed(f"the worker for model {self.name!r} answered its ready route unexpectedly: {exc!r}", cause="exit")
        await self._fetch_phases(spawn_unix)

    async def _wait_ready(self) -> None:
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
            if r.status_code == 200:
                return
            if body.get("state") == "failed":
                raise StartFailed(f"model {self.name!r} failed to load from {self.model.path}: {body.get('error')}")

    async def _fetch_phases(self, spawn_unix: float) -> None:
        assert self.client is not None
        try:
            r = await self.client.get("/zerostart/phases", timeout=_CONNECT_TIMEOUT_S)
            r.raise_for_status()
            body = r.json()
            # The worker's phases are relative to its own origin (the first line it ran).
            # Spawn ends where the worker's first phase begins (its HTTP server is up by then).
            shift = float(body["origin_unix"]) - spawn_unix
            worker = body["timeline"]["phases"]
            first = min((float(p["start_s"]) for p in worker), default=0.0)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise StartFailed(f"the worker for model {self.name!r} did not report its load phases ({e!r})",
                              cause="exit") from None
        self.timeline.add_relative("spawn", 0.0, max(0.0, shift + first))
        self.timeline.merge(body["timeline"], shift=shift)

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
        sock.listen(max(128, self.model.max_concurrency * 2))
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
        m = self.model
        cmd = [sys.executable, "-m", "zerostart.serve._worker", "--fd", str(fd), "--model", m.path,
               "--name", self.name, "--device", m.device]
        if m.dtype:
            cmd += ["--dtype", m.dtype]
        if m.max_model_len:
            cmd += ["--max-model-len", str(m.max_model_len)]
        if m.kv_cache_bytes:
            cmd += ["--kv-cache-bytes", str(m.kv_cache_bytes)]
        return cmd

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
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
            self._on_exit(self)

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
