"""The cold-start table's peers, and one way to time any OpenAI server.

- :func:`vllm_cold_start`: vLLM's OpenAI server started as its users start it (eager, or
  compiled: its default), with its default loader or ``--load-format zerostart``; the clock
  runs from the spawn to the first token of the same request zerostart's rungs answer, the
  phases read off vLLM's log as the ``vllm`` backend reads them.
- :func:`hot_tokens_per_s`: generated tokens per second at a batch of B concurrent requests,
  the same request shape for every engine (``ignore_eos``, so every one generates all tokens).
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
from typing import Any

from zerostart.bench import _env
from zerostart.serve.backends import LogPhases, VllmWorker

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


class VllmServer:
    """One ``python -m vllm.entrypoints.openai.api_server`` process on a loopback port, its
    output timed line by line into cold-start phases."""

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
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=_env.child_env({"PYTHONUNBUFFERED": "1"}), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.log = LogPhases(VllmWorker.markers, VllmWorker.last_phase, origin=self.t0, details=VllmWorker.details)
        self.tail: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.feed(line, time.perf_counter())
            self.tail = (self.tail + [line.rstrip()])[-30:]

    def wait_ready(self, timeout: float) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.proc.returncode}) while {self.log.current}: "
                                   + " | ".join(self.tail[-4:]))
            try:
                if call(self.url + "/health", timeout=2)[0] == 200:
                    return time.perf_counter()
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"vLLM not ready within {timeout:g} s (it was in phase {self.log.current})")

    def close(self) -> None:
        """SIGTERM to its whole process group (API server, engine core, worker), then SIGKILL."""
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # what the API server left behind
        except ProcessLookupError:
            pass
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


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
    tokens/s at each of ``hot_batches``."""
    srv = VllmServer(python, model, mode=mode, loader=loader)
    try:
        ready = srv.wait_ready(timeout)
        done = first_token(srv.url, prompt_tokens, timeout)
        tl = srv.log.timeline(ready, label=f"vllm {mode} {loader}")
        tl.add("first_token", ready, done)
        run = {"total_s": done - srv.t0, "timeline": tl.to_dict()}
        run["hot"] = {str(b): hot_tokens_per_s(srv.url, b, max_tokens) for b in hot_batches}
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
