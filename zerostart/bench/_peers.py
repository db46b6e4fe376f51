"""The cold-start table's peers, and one way to time any OpenAI server.

- :class:`VllmServer`: vLLM's OpenAI server started as its users start it (eager, or compiled:
  its default), with its default loader or ``--load-format zerostart``;
  :func:`vllm_cold_start` times it from the spawn to the first token of the same request
  zerostart's rungs answer, the phases read off vLLM's log as the ``vllm`` backend reads them.
- :class:`LlamaServer`: llama.cpp's ``llama-server`` on a GGUF file (or without one: its
  router), its phases read as the ``llamacpp`` backend reads them (its rungs: ``_llamacpp_runs``).
- :func:`hot_tokens_per_s`: generated tokens per second at a batch of B concurrent requests,
  the same request shape for every engine (``ignore_eos``, so every one generates all tokens).
- :func:`tree_bytes`: what a server's processes hold (their summed proportional set size).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from zerostart.bench import _env
from zerostart.serve.backends import LlamacppWorker, LogPhases, VllmWorker, host_bytes_of_tree

VLLM_MODES = ("eager", "compiled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict[str, Any] | None = None, timeout: float = 600.0) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw.strip().startswith(b"{") else {}
    except urllib.error.HTTPError as e:
        return e.code, {}


def tree_bytes(pid: int) -> int:
    """What process ``pid`` and its descendants hold: their summed proportional set size."""
    return host_bytes_of_tree(pid)


class _Server:
    """A server process on a loopback port (its own session), its output timed line by line
    into cold-start phases by the markers of its backend."""

    engine = "the server"
    url: str  # where it listens (set by the subclass before it starts the process)

    def __init__(self, argv: list[str], backend: Any, label: str, env: dict[str, str] | None = None) -> None:
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.log = LogPhases(backend.markers, backend.last_phase, origin=self.t0, details=backend.details)
        self.label = label
        self.tail: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.feed(line, time.perf_counter())
            self.tail = (self.tail + [line.rstrip()])[-30:]

    def wait_ready(self, timeout: float, path: str = "/health") -> float:
        """``perf_counter`` when ``path`` first answered 200."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.engine} exited ({self.proc.returncode}) while {self.log.current}: "
                                   + " | ".join(self.tail[-4:]))
            try:
                if call(self.url + path, timeout=2)[0] == 200:
                    return time.perf_counter()
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.engine} not ready within {timeout:g} s (it was in phase {self.log.current})")

    def timeline(self, ready: float, done: float) -> dict[str, Any]:
        tl = self.log.timeline(ready, label=self.label)
        tl.add("first_token", ready, done)
        return tl.to_dict()

    def signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """SIGTERM to its whole process group, then SIGKILL."""
        self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            self.signal(sig)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.signal(signal.SIGKILL)  # what it left behind
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class VllmServer(_Server):
    """One ``python -m vllm.entrypoints.openai.api_server`` process."""

    engine = "vLLM"

    def __init__(self, python: str, model: str, *, mode: str = "eager", loader: str = "auto",
                 kv_cache_bytes: int = 256 << 20, extra: list[str] | None = None) -> None:
        if mode not in VLLM_MODES:
            raise ValueError(f"vLLM mode must be one of {VLLM_MODES}, got {mode!r}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", "m",
                "--host", "127.0.0.1", "--port", str(self.port), "--kv-cache-memory-bytes", str(kv_cache_bytes),
                "--load-format", loader, "--disable-uvicorn-access-log"]
        if mode == "eager":
            argv.append("--enforce-eager")
        argv += extra or []
        super().__init__(argv, VllmWorker, f"vllm {mode} {loader}", _env.child_env({"PYTHONUNBUFFERED": "1"}))


class LlamaServer(_Server):
    """One ``llama-server`` on ``gguf`` (served as ``m``), on the CPU with ``threads`` threads and
    ``parallel`` slots over one KV cache of ``ctx_size`` tokens, as the ``llamacpp`` backend
    starts it. ``gguf`` None: its router, serving the models of ``extra``'s preset."""

    engine = "llama-server"

    def __init__(self, server: str, gguf: str | None, *, threads: int, parallel: int = 4, ctx_size: int = 4096,
                 extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [server, "--host", "127.0.0.1", "--port", str(self.port), "--metrics", "--no-webui"]
        if gguf is not None:
            argv += ["--model", gguf, "--alias", "m"]
            for key, value in self.model_options(threads, parallel, ctx_size).items():
                argv += [f"--{key}"] + ([value] if value is not None else [])
        super().__init__(argv + list(extra), LlamacppWorker, "llama.cpp", dict(os.environ))

    @staticmethod
    def model_options(threads: int, parallel: int, ctx_size: int) -> dict[str, str | None]:
        """Its options for the model, by name (None: a flag), as the llamacpp backend sets them."""
        return {"parallel": str(parallel), "kv-unified": None, "ctx-size": str(ctx_size), "device": "none",
                "threads": str(threads), "threads-batch": str(threads)}


def first_token(url: str, prompt_tokens: int, timeout: float = 600.0) -> float:
    """The cold-start table's request: a prompt of ``prompt_tokens`` token ids, one token out.
    Returns ``perf_counter`` when the answer arrived."""
    status, body = call(url + "/v1/completions", {"model": "m", "prompt": [7] * prompt_tokens, "max_tokens": 1,
                                                  "temperature": 0}, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"the first request answered HTTP {status}: {body}")
    return time.perf_counter()


def vllm_cold_start(python: str, model: str, *, mode: str, loader: str, prompt_tokens: int, timeout: float,
                    hot_batches: tuple[int, ...] = (), max_tokens: int = 128) -> dict[str, Any]:
    """One cold start of vLLM to its first token (with its phases), then, if asked, its hot
    tokens/s at each of ``hot_batches`` and what its processes hold after them."""
    srv = VllmServer(python, model, mode=mode, loader=loader)
    try:
        ready = srv.wait_ready(timeout)
        done = first_token(srv.url, prompt_tokens, timeout)
        run = {"total_s": done - srv.t0, "timeline": srv.timeline(ready, done)}
        run["hot"] = {str(b): hot_tokens_per_s(srv.url, b, max_tokens) for b in hot_batches}
        if hot_batches:
            run["held_bytes"] = tree_bytes(srv.proc.pid)
        return run
    finally:
        srv.close()


def hot_tokens_per_s(url: str, batch: int, max_tokens: int = 128, prompt_tokens: int = 16,
                     model: str = "m", rounds: int = 2) -> float:
    """Generated tokens per second with ``batch`` requests in flight at once, each generating
    ``max_tokens`` (``ignore_eos``); the best of ``rounds`` (the first warms the server's
    batch shapes)."""
    body = {"model": model, "prompt": [7] * prompt_tokens, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}

    def one(_: int) -> int:
        status, out = call(url + "/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"a hot request answered HTTP {status}")
        return int(out["usage"]["completion_tokens"])

    best = 0.0
    with ThreadPoolExecutor(batch) as ex:
        for _ in range(rounds):
            t0 = time.perf_counter()
            tokens = sum(ex.map(one, range(batch)))
            best = max(best, tokens / (time.perf_counter() - t0))
    return best
