"""Helpers for the gateway tests: real gateways (``zerostart serve`` subprocesses on loopback)
whose workers are real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

import zerostart
from zerostart.serve.control import LoadSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
API_KEY = "test-key"
# A completion of fixed length whose text is the same every time (greedy, past any EOS).
GREEDY: dict[str, Any] = dict(prompt="Once upon a time", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
# A stream that stays in flight while the client does not read it: 64 choices of up to 500
# tokens are megabytes of events, far more than the sockets between here and the worker buffer.
LONG_STREAM: dict[str, Any] = dict(prompt="go", max_tokens=500, n=64, stream=True, extra_body={"ignore_eos": True})


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Gateway:
    """A ``zerostart serve`` process on a free loopback port."""

    def __init__(self, config: dict[str, Any], tmp_dir: str, api_key: str | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.config_path = os.path.join(tmp_dir, "config.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.api_key = api_key
        self.log: list[str] = []
        self._clients: list[Any] = []
        cmd = [sys.executable, "-m", "zerostart", "serve", "--config", self.config_path, "--port", "0"]
        self.proc = subprocess.Popen(cmd + (extra_args or []), env={**child_env(), **(env or {})}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.url = self._wait_for_url()
        threading.Thread(target=self._drain, daemon=True).start()
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # A client must let an idle connection go before the server closes it (after
        # server.header_timeout, 10 s by default), or it may send on one being closed: a config
        # with a shorter one gets clients whose pools expire sooner than httpx's 5 s.
        self.keepalive_expiry = min(5.0, float(config.get("server", {}).get("header_timeout", 10.0)) / 2)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60, limits=self._limits(100, 20))

    def _wait_for_url(self) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if "serving on " in line:
                return line.split("serving on ", 1)[1].split("/v1", 1)[0]
        self.proc.kill()
        raise RuntimeError("gateway did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    # -- clients --------------------------------------------------------------------------

    def _limits(self, connections: int, keepalive: int) -> httpx.Limits:
        return httpx.Limits(max_connections=connections, max_keepalive_connections=keepalive,
                            keepalive_expiry=self.keepalive_expiry)

    def openai(self, **kw: Any) -> Any:
        import openai

        if self.keepalive_expiry < 5.0 and "http_client" not in kw:  # openai's pool (and timeout), expiring sooner
            kw["http_client"] = httpx.Client(limits=self._limits(1000, 100), timeout=600)
        kw.setdefault("api_key", self.api_key or "none")  # another key: another tenant
        client = openai.OpenAI(base_url=self.url + "/v1", max_retries=0, **kw)
        self._clients.append(client)  # closed by stop()
        return client

    async def burst(self, n: int, *, clients: int = 25, **create: Any) -> list[Any]:
        """``n`` concurrent ``completions.create`` calls (raw responses, or the exceptions),
        spread over several async openai clients: one httpx pool with hundreds of connections
        costs the test process more CPU than the gateway it is testing."""
        pool = [self.async_openai(connections=n // clients + 1) for _ in range(clients)]
        try:
            return await asyncio.gather(*(pool[i % clients].completions.with_raw_response.create(**create)
                                          for i in range(n)), return_exceptions=True)
        finally:
            for c in pool:
                await c.close()

    def async_openai(self, connections: int = 100, **kw: Any) -> Any:
        import openai

        http = httpx.AsyncClient(limits=self._limits(connections, connections), timeout=120)
        # openai annotates its own httpx2 client; it takes an httpx one too (openai._httpx2)
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0,
                                  http_client=http, **kw)  # type: ignore[arg-type]

    # -- observing --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        r = self.http.get("/zerostart/status")
        r.raise_for_status()
        return r.json()

    def model(self, name: str) -> dict[str, Any]:
        for m in self.status()["models"]:
            if m["name"] == name:
                return m
        raise KeyError(name)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples by (name, sorted labels)."""
        r = self.http.get("/metrics")
        r.raise_for_status()
        out = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def cold_starts(self, model: str, rung: str | None = None, *, ahead: bool = False) -> float:
        """Cold starts of ``model`` that reached ready, from ``rung`` (None: any rung); ``ahead``:
        only those begun with no request waiting."""
        metric = "zerostart_climbs_ahead_total" if ahead else "zerostart_cold_starts_total"
        return sum(v for (name, labels), v in self.metrics().items() if name == metric
                   and dict(labels)["model"] == model and rung in (None, dict(labels)["rung"]))

    def phase_count(self, model: str, phase: str) -> float:
        """Cold starts of ``model`` (any rung) whose timeline had ``phase``."""
        return sum(v for (name, labels), v in self.metrics().items()
                   if name == "zerostart_cold_start_phase_seconds_count" and dict(labels)["model"] == model
                   and dict(labels)["phase"] == phase)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n" + self.tail())

    def worker_pids(self, name: str) -> list[int]:
        """Live worker processes of model ``name`` that this gateway started (from /proc)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            spec = next((a.removeprefix(b"--spec=") for a in args if a.startswith(b"--spec=")), b"")
            if (b"zerostart.serve.worker" in args and spec and LoadSpec.model_validate_json(spec).name == name
                    and stat[0] != "Z" and int(stat[1]) == self.proc.pid):
                pids.append(int(entry))
        return pids

    def tail(self, n: int = 40) -> str:
        return "".join(self.log[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        for client in self._clients:
            client.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie awaiting its reaper counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)


# -- workers, reached directly (as anyone else on the host would) ------------------------------


def worker_token(pid: int, variable: str = "ZEROSTART_WORKER_TOKEN") -> str:
    """A worker's token (``variable``: where its engine reads it), from its environment as the
    kernel shows it to processes of the same user."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        for entry in f.read().split(b"\0"):
            if entry.startswith(variable.encode() + b"="):
                return entry.split(b"=", 1)[1].decode()
    raise KeyError(f"pid {pid} has no {variable}")


def worker_client(address: str, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
    """An HTTP client for a worker at ``unix:/path`` or ``http://host:port``."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if address.startswith("unix:"):
        return httpx.Client(transport=httpx.HTTPTransport(uds=address[len("unix:"):]), base_url="http://worker",
                            headers=headers, timeout=timeout)
    return httpx.Client(base_url=address, headers=headers, timeout=timeout)


class ServerThread:
    """A uvicorn server for an ASGI app, in a thread of this process, on a free loopback port."""

    def __init__(self, app: Any, **config: Any) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def rss(pid: int) -> int:
    """A process's resident memory in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def weights_bytes(path: str) -> int:
    """The (bfloat16) checkpoint's weights as a CPU worker holds them, in the engine's default dtype."""
    from zerostart import weights
    from zerostart.names import DTYPE_BYTES, default_dtype

    width = DTYPE_BYTES[default_dtype("cpu", "bfloat16")]
    return sum(t.numel * width for h in weights.resolve(path).headers for t in h.tensors.values())
