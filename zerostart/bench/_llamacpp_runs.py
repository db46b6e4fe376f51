"""llama.cpp's ``llama-server`` from each rung it could rest on, for ``bench engines``: each run
is a real server answering the cold-start table's request (16 prompt tokens, one token out),
timed to that first token, with the phases of its log on the same clock.

- ``source``  spawn on the GGUF file, evicted from the page cache first (that file only)
- ``image``   spawn on the GGUF file in the page cache (read once first): what a restart costs
              on a running machine, since llama.cpp maps the file
- ``hot``     a server that has answered already: the request alone
- ``sleep``   llama-server's own idle sleep (``--sleep-idle-seconds``): the process stays, the
              model and KV cache are freed; the request reloads them (a standby server, alive
              without its model)
- ``router``  llama-server's router mode, started without a model (a standby process):
              ``POST /models/load``, then the request
- ``sigstop`` a hot server stopped with SIGSTOP and continued with SIGCONT (a "parked" process
              that keeps its memory): the request after the SIGCONT

Each run also says what the server's processes held (proportional set size): while hot, and,
where the rung keeps a process, while resting on it. :func:`hot` measures generated tokens/s at
each batch with ``threads`` threads and what the server held after.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from typing import Any, Callable

from zerostart import weights
from zerostart.bench import _ceilings
from zerostart.bench._peers import LlamaServer, call, first_token, hot_tokens_per_s, tree_bytes
from zerostart.telemetry import Timeline

_SLEEP_AFTER_S = 1  # --sleep-idle-seconds for the sleep rung
_SETTLE_S = 0.5  # after a SIGSTOP, before its memory is measured


def _fresh(rung: str, server: str, gguf: str, threads: int, prompt_tokens: int, timeout: float) -> dict[str, Any]:
    if rung == "source":
        left = weights.evict_page_cache([gguf])[0].resident_after
    else:
        _ceilings.warm([gguf])
        left = weights.cached_fraction(gguf)
    srv = LlamaServer(server, gguf, threads=threads)
    try:
        ready = srv.wait_ready(timeout)
        done = first_token(srv.url, prompt_tokens, timeout)
        return {"rung": rung, "total_s": done - srv.t0, "timeline": srv.timeline(ready, done),
                "page_cache_fraction": round(left, 4), "held_bytes": tree_bytes(srv.proc.pid)}
    finally:
        srv.close()


def _source(server, gguf, threads, prompt_tokens, timeout):
    return _fresh("source", server, gguf, threads, prompt_tokens, timeout)


def _image(server, gguf, threads, prompt_tokens, timeout):
    return _fresh("image", server, gguf, threads, prompt_tokens, timeout)


def _climb(rung: str, srv: LlamaServer, prompt_tokens: int, timeout: float, resting: int,
           wake: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time ``wake()`` (if any) and the request from now; the run of a rung that keeps a process."""
    start = time.perf_counter()
    if wake is not None:
        wake()
    asked = time.perf_counter()
    done = first_token(srv.url, prompt_tokens, timeout)
    tl = Timeline(origin=start, label=f"llama.cpp {rung}")
    if wake is not None:
        tl.add("wake", start, asked)
    tl.add("first_token", asked, done)
    return {"rung": rung, "total_s": done - start, "timeline": tl.to_dict(), "resting_bytes": resting,
            "held_bytes": tree_bytes(srv.proc.pid)}


def _serving(server: str, gguf: str, threads: int, prompt_tokens: int, timeout: float,
             extra: tuple[str, ...] = ()) -> LlamaServer:
    """A llama-server on the GGUF (in the page cache) that has answered once."""
    _ceilings.warm([gguf])
    srv = LlamaServer(server, gguf, threads=threads, extra=extra)
    try:
        srv.wait_ready(timeout)
        first_token(srv.url, prompt_tokens, timeout)
    except BaseException:
        srv.close()
        raise
    return srv


def _hot(server, gguf, threads, prompt_tokens, timeout):
    srv = _serving(server, gguf, threads, prompt_tokens, timeout)
    try:
        return _climb("hot", srv, prompt_tokens, timeout, tree_bytes(srv.proc.pid))
    finally:
        srv.close()


def _sleep(server, gguf, threads, prompt_tokens, timeout):
    srv = _serving(server, gguf, threads, prompt_tokens, timeout, ("--sleep-idle-seconds", str(_SLEEP_AFTER_S)))
    try:
        deadline = time.monotonic() + 30 + _SLEEP_AFTER_S
        while not call(srv.url + "/props", timeout=10)[1].get("is_sleeping"):
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not go to sleep")
            time.sleep(0.1)
        return _climb("sleep", srv, prompt_tokens, timeout, tree_bytes(srv.proc.pid))
    finally:
        srv.close()


def _router(server, gguf, threads, prompt_tokens, timeout):
    _ceilings.warm([gguf])
    with tempfile.TemporaryDirectory(prefix="zerostart-llama-router-") as d:
        preset = os.path.join(d, "models.ini")
        options = LlamaServer.model_options(threads, 4, 4096)
        with open(preset, "w") as f:  # the same options, as a preset of the router's one model
            f.write(f"version = 1\n\n[m]\nmodel = {gguf}\n"
                    + "".join(f"{k} = {'true' if v is None else v}\n" for k, v in options.items()))
        srv = LlamaServer(server, None, threads=threads, extra=["--models-preset", preset, "--no-models-autoload"])
        try:
            srv.wait_ready(timeout)
            resting = tree_bytes(srv.proc.pid)

            def load() -> None:
                status, body = call(srv.url + "/models/load", {"model": "m"}, timeout=timeout)
                if status != 200:
                    raise RuntimeError(f"POST /models/load answered HTTP {status}: {body}")
                deadline = time.monotonic() + timeout
                while _status(srv, "m") != "loaded":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the router did not load the model in time")
                    time.sleep(0.01)

            return _climb("router", srv, prompt_tokens, timeout, resting, load)
        finally:
            srv.close()


def _status(srv: LlamaServer, model: str) -> str | None:
    _, body = call(srv.url + "/models", timeout=10)
    for m in body.get("data", []):
        if m.get("id") == model:
            return (m.get("status") or {}).get("value")
    return None


def _sigstop(server, gguf, threads, prompt_tokens, timeout):
    srv = _serving(server, gguf, threads, prompt_tokens, timeout)
    try:
        hot = tree_bytes(srv.proc.pid)
        srv.signal(signal.SIGSTOP)
        time.sleep(_SETTLE_S)
        run = _climb("sigstop", srv, prompt_tokens, timeout, tree_bytes(srv.proc.pid),
                     lambda: srv.signal(signal.SIGCONT))
        run["hot_bytes"] = hot
        return run
    finally:
        srv.close()


RUNGS: dict[str, Callable[[str, str, int, int, float], dict[str, Any]]] = {
    "source": _source, "image": _image, "hot": _hot, "sleep": _sleep, "router": _router, "sigstop": _sigstop}


def run(rung: str, server: str, gguf: str, *, threads: int, prompt_tokens: int, timeout: float) -> dict[str, Any]:
    """One run of llama-server from ``rung`` (one of :data:`RUNGS`)."""
    return RUNGS[rung](server, gguf, threads, prompt_tokens, timeout)


def hot(server: str, gguf: str, *, threads: int, batches: tuple[int, ...], max_tokens: int, prompt_tokens: int,
        timeout: float) -> dict[str, Any]:
    """Generated tokens/s of a hot llama-server at each batch (``parallel`` = the largest batch,
    so every request of a batch decodes together), and what it held after them."""
    _ceilings.warm([gguf])
    srv = LlamaServer(server, gguf, threads=threads, parallel=max(batches),
                      ctx_size=max(batches) * (prompt_tokens + max_tokens + 16))
    try:
        srv.wait_ready(timeout)
        tok_s = {str(b): hot_tokens_per_s(srv.url, b, max_tokens, prompt_tokens) for b in batches}
        return {"tok_s": tok_s, "held_bytes": tree_bytes(srv.proc.pid)}
    finally:
        srv.close()
