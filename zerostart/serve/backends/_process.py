"""A worker's process, whatever its engine: the gateway binds its listening socket itself (a
Unix socket, or a free loopback port) and hands the descriptor to the child, so the address is
known before the process runs and requests can be sent as soon as it accepts. Its stdin is a
pipe the gateway never writes: when the gateway goes away, a worker that watches stdin sees
end-of-file and exits. Its output is kept (the last lines) for error messages.

Each worker gets a secret of its own (:attr:`WorkerProcess.token`), sent with every request the
gateway makes to it; a backend hands it to its engine (the zerostart worker reads
``control.TOKEN_ENV``), which answers nobody else: anyone else on the host who can reach
the socket or port gets 401.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from zerostart.serve._config import API_KEYS_ENV, ServerConfig
from zerostart.serve.edge import StartFailed
from zerostart.serve.backends._upstream import IDLE_S, UpstreamPool

log = logging.getLogger("zerostart.serve")
worker_log = logging.getLogger("zerostart.serve.worker")

CONNECT_TIMEOUT_S = 10.0  # loopback / unix connects to a live worker are immediate
_LOG_TAIL_LINES = 40  # worker output kept for error messages
_UNIX_PATH_MAX = 107
_EXIT_POLL_S = 0.05  # how often a worker's exit is looked for


def inherited_env() -> dict[str, str]:
    """The gateway's environment as a worker process starts with it: without the gateway's own
    secrets (its API keys, ``API_KEYS_ENV``), which nothing a worker runs has a use for."""
    env = dict(os.environ)
    env.pop(API_KEYS_ENV, None)
    return env


@dataclass(frozen=True)
class Moment:
    """One instant on both clocks: ``time.time()`` to line up with a worker's own timeline,
    ``perf_counter()`` for the gateway's."""

    unix: float
    perf: float

    @classmethod
    def now(cls) -> Moment:
        return cls(time.time(), time.perf_counter())


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class WorkerProcess:
    """One child process serving HTTP on a socket of the gateway's choosing. ``label`` names it
    in messages (the model, or ``standby``); ``on_exit`` runs when it exits unasked."""

    def __init__(self, label: str, server: ServerConfig, socket_dir: str, on_exit: Callable[[], None],
                 *, id: int, backlog: int = 128) -> None:
        self.label = label
        self._server = server
        self._socket_dir = socket_dir
        self._id = id  # unique in this gateway: names the unix socket
        self._backlog = backlog
        self._on_exit = on_exit
        self.pid: int | None = None
        self.token = secrets.token_urlsafe(32)  # the worker answers requests that carry it, no others
        self.address: str | None = None  # "unix:/path" or "http://host:port"
        self.client: httpx.AsyncClient | None = None  # control routes
        self.upstream: UpstreamPool | None = None  # the proxied OpenAI requests
        self.spawned_at = 0.0  # monotonic
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self._expected_exit = False
        self._proc: asyncio.subprocess.Process | None = None
        self._socket_path: str | None = None
        self._tcp_address: tuple[str, int] = ("", 0)
        self._tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        self._tasks: list[asyncio.Task[Any]] = []
        self.on_line: Callable[[str, float], None] | None = None  # each output line, with perf_counter at arrival

    # -- starting ---------------------------------------------------------------------------

    async def spawn(self, command: Callable[[int], list[str]], env: dict[str, str]) -> Moment:
        """Bind the socket and start ``command(fd)`` with it; returns when it was spawned.
        Raises :class:`StartFailed` (cause ``spawn``)."""
        try:
            sock = self._listen()
        except OSError as e:
            raise StartFailed(f"could not open a socket for model {self.label!r}'s worker ({e}); check "
                              "server.socket_dir / server.worker_host", cause="spawn") from None
        spawned = Moment.now()
        self.spawned_at = time.monotonic()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *command(sock.fileno()), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, pass_fds=(sock.fileno(),), env=env,
                start_new_session=True)  # ^C at the terminal reaches the gateway, which stops workers in order
        except OSError as e:
            raise StartFailed(f"could not start a worker process for model {self.label!r}: {e}", cause="spawn") from None
        finally:
            sock.close()  # the worker holds its own copy; ours would keep dead workers connectable
        self.pid = self._proc.pid
        self._tasks = [asyncio.create_task(self._read_output()), asyncio.create_task(self._watch_exit())]
        self.client = self._make_client()
        if self._socket_path is not None:
            self.upstream = UpstreamPool(uds=self._socket_path, connect_timeout=CONNECT_TIMEOUT_S, token=self.token)
        else:
            host, port = self._tcp_address
            self.upstream = UpstreamPool(host=host, port=port, connect_timeout=CONNECT_TIMEOUT_S, token=self.token)
        return spawned

    async def launch(self, argv: Callable[[str, int], list[str]], env: dict[str, str]) -> Moment:
        """Start a server that binds its own listening socket (a foreign engine: vLLM, SGLang,
        llama.cpp ...) on ``server.worker_host`` and a free port: ``argv(host, port)`` is its
        command line. Returns when it was spawned; raises :class:`StartFailed` (cause ``spawn``)."""
        host = self._server.worker_host
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind((host, 0))  # a free port now; the engine binds it a moment later
                port = s.getsockname()[1]
        except OSError as e:
            raise StartFailed(f"could not find a free port on {host} for model {self.label!r}'s worker ({e}); "
                              "check server.worker_host", cause="spawn") from None
        self._tcp_address = (host, port)
        self.address = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        command = argv(host, port)
        spawned = Moment.now()
        self.spawned_at = time.monotonic()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            raise StartFailed(f"could not start {command[0]!r} for model {self.label!r}: {e}", cause="spawn") from None
        self.pid = self._proc.pid
        self._tasks = [asyncio.create_task(self._read_output()), asyncio.create_task(self._watch_exit())]
        self.client = self._make_client()
        # the token goes with every request: an engine that checks it (a zerostart worker, vLLM
        # with it as VLLM_API_KEY) answers only this gateway; one that does not ignores it
        self.upstream = UpstreamPool(host=host, port=port, connect_timeout=CONNECT_TIMEOUT_S, token=self.token)
        return spawned

    def _listen(self) -> socket.socket:
        if self._server.worker_transport == "unix":
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.label)[:40]
            path = os.path.join(self._socket_dir, f"{safe}-{self._id}.sock")
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
        sock.listen(max(128, self._backlog))
        sock.set_inheritable(True)
        return sock

    def _make_client(self) -> httpx.AsyncClient:
        # idle connections expire before the worker's server closes them (see _upstream.IDLE_S)
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=IDLE_S)
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)  # each call sets its own read timeout
        headers = {"authorization": f"Bearer {self.token}"}
        if self._socket_path is not None:
            transport = httpx.AsyncHTTPTransport(uds=self._socket_path, limits=limits)
            return httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=timeout, headers=headers)
        assert self.address is not None
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(limits=limits), base_url=self.address,
                                 timeout=timeout, headers=headers)

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
                            self.label, self.pid, timeout)
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
        """To the worker's whole process group (its own session): an engine's children (vLLM's
        engine core and workers) go with it, also when it died first and left them behind."""
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:  # the group is empty
            pass
        except PermissionError:  # not our group after all: the process alone
            try:
                self._proc.send_signal(sig)
            except ProcessLookupError:
                pass

    # -- watching ---------------------------------------------------------------------------

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
            worker_log.debug("[%s pid %s] %s", self.label, self.pid, text)
            if self.on_line is not None:
                self.on_line(text, time.perf_counter())

    async def _watch_exit(self) -> None:
        assert self._proc is not None
        # Not Process.wait(): it returns once every pipe is closed as well, and an engine's
        # children (vLLM's engine core and worker) keep its output pipe open after it died.
        # The return code is there as soon as the process is reaped.
        while self._proc.returncode is None:
            await asyncio.sleep(_EXIT_POLL_S)
        self.exit_code = self._proc.returncode
        self._signal(signal.SIGKILL)  # what it left behind in its group (an engine's children), crash or not
        # let the output reader drain the last lines (a traceback) before anyone reports them
        await asyncio.wait({self._tasks[0]}, timeout=1.0)
        self.exited.set()
        self._unlink_socket()
        if not self._expected_exit:
            log.warning("model %s: worker pid %s exited unexpectedly (%s)", self.label, self.pid,
                        describe_exit(self.exit_code))
            self._on_exit()

    def _unlink_socket(self) -> None:
        if self._socket_path and os.path.exists(self._socket_path):
            try:
                os.unlink(self._socket_path)
            except OSError:
                pass

    def exit_message(self, when: str) -> str:
        return (f"the worker for model {self.label!r} (pid {self.pid}) exited with {describe_exit(self.exit_code)} "
                f"{when}{self._last_words()}")

    def _last_words(self) -> str:
        lines = [x for x in self._tail if x.strip()]
        if not lines:
            return ""
        # a traceback's last line names the error; the line before often names the file
        return "; its last output: " + " | ".join(lines[-3:])
