"""A worker process: holds one model and speaks the OpenAI API, plus control routes.

Started by the gateway with a listening socket already bound (``--fd``)::

    python -m zerostart.serve._worker --fd 5 --model PATH --name NAME [--device cpu] [--dtype bfloat16]

or on its own, for a direct comparison or debugging::

    python -m zerostart.serve._worker --model PATH (--port 8001 [--host 127.0.0.1] | --uds /tmp/w.sock)

It serves HTTP at once and loads the model in the background, so the gateway can ask how the
load is going. Routes:

- ``GET /zerostart/ready?wait=SECONDS``: 200 once loaded, 503 ``{"state": "loading", "phase"}``
  while loading (after waiting up to ``wait`` seconds for it to finish), 500
  ``{"state": "failed", "error"}`` if the load failed.
- ``GET /zerostart/phases``: the load's phase timeline, relative to ``origin_unix`` (the moment
  this process began running Python code of ours).
- ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``.

The cold ladder's ``park`` and ``wake`` join the control routes here.
"""

import time

_ORIGIN = time.perf_counter()  # everything before this line is the gateway's "spawn" phase
_ORIGIN_UNIX = time.time()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from typing import Any, AsyncIterator  # noqa: E402

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from zerostart.telemetry import Timeline  # noqa: E402

log = logging.getLogger("zerostart.serve.worker")

_ORPHAN_GRACE_S = 10.0  # after the gateway is gone: time to shut down cleanly before a hard exit
_SHUTDOWN_GRACE_S = 5  # on SIGTERM: how long open requests may take to finish


class _Loader:
    """Loads the engine on a background thread and records the phases."""

    def __init__(self, path: str, name: str, device: str, dtype: str | None, engine_options: dict[str, Any]) -> None:
        self.path, self.name, self.device, self.dtype = path, name, device, dtype
        self.engine_options = engine_options  # EngineConfig fields the gateway sets
        self.timeline = Timeline(origin=_ORIGIN, label="worker")
        self.state = "loading"
        self.phase = "import"
        self.error: str | None = None
        self.engine: Any = None
        self.routes: Any = None  # the OpenAI routes over the engine, once loaded
        self._done = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._run, name="zerostart-loader", daemon=True).start()

    def _run(self) -> None:
        try:
            t0 = time.perf_counter()
            from zerostart.engine import Engine, EngineConfig  # torch and the engine: the fixed cost of a cold start

            t1 = time.perf_counter()
            self.phase = "load"
            engine = Engine.from_pretrained(self.path, device=self.device, dtype=self.dtype,
                                            config=EngineConfig(**self.engine_options))
            # The engine's phases (import, device_init, read, copy, prepare, warmup) on our origin;
            # the engine times its own import where it can, else ours stands in.
            etl = engine.timeline
            self.timeline.merge(etl, shift=etl.origin - _ORIGIN)
            if self.timeline.get("import") is None:
                self.timeline.add("import", t0, t1)
            self.phase = "engine_start"
            engine.start()
            # the request path's modules too, so the first request pays for none of it
            from zerostart.serve._openai import OpenAIRoutes

            self.routes = OpenAIRoutes(engine, self.name)
            self.engine = engine
            self.state, self.phase = "ready", "ready"
        except BaseException as e:  # noqa: BLE001 - reported to the gateway, which stops this process
            self.error = f"{type(e).__name__}: {e}"
            self.state = "failed"
            traceback.print_exc()
        finally:
            with self._lock:
                self._done.set()
                for loop, ev in self._waiters:
                    loop.call_soon_threadsafe(ev.set)

    async def wait(self, timeout: float) -> None:
        if self._done.is_set() or timeout <= 0:
            return
        ev = asyncio.Event()
        with self._lock:
            if self._done.is_set():
                return
            self._waiters.append((asyncio.get_running_loop(), ev))
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass


def build_app(loader: _Loader, name: str) -> Starlette:
    def not_ready() -> Response:
        msg = (f"model {name!r} failed to load: {loader.error}" if loader.state == "failed"
               else f"model {name!r} is still loading (phase: {loader.phase})")
        return JSONResponse({"error": {"message": msg, "type": "server_error", "param": None, "code": "not_ready"}},
                            status_code=503)

    async def ready(request: Request) -> Response:
        try:
            wait = float(request.query_params.get("wait", "0"))
        except ValueError:
            wait = 0.0
        await loader.wait(wait)
        if loader.state == "ready":
            e = loader.engine
            return JSONResponse({"state": "ready", "phase": "ready", "model": name, "pid": os.getpid(),
                                 "device": str(e.device), "max_model_len": e.max_model_len})
        if loader.state == "failed":
            return JSONResponse({"state": "failed", "phase": loader.phase, "error": loader.error}, status_code=500)
        return JSONResponse({"state": "loading", "phase": loader.phase}, status_code=503)

    async def phases(request: Request) -> Response:
        return JSONResponse({"origin_unix": _ORIGIN_UNIX, "state": loader.state, "timeline": loader.timeline.to_dict()})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": loader.state}, status_code=200 if loader.state != "failed" else 500)

    def served(route: str):
        async def handler(request: Request) -> Response:
            if loader.state != "ready":
                return not_ready()
            return await getattr(loader.routes, route)(request)

        return handler

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if loader.engine is not None:
            loader.engine.stop()

    return Starlette(lifespan=lifespan, routes=[
        Route("/zerostart/ready", ready),
        Route("/zerostart/phases", phases),
        Route("/health", health),
        Route("/v1/models", served("models")),
        Route("/v1/chat/completions", served("chat"), methods=["POST"]),
        Route("/v1/completions", served("completions"), methods=["POST"]),
    ])


def _watch_parent() -> None:
    """The gateway holds our stdin open; end-of-file means it is gone, and so should we be."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(_ORPHAN_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="zerostart-parent-watch", daemon=True).start()


def _socket(args: argparse.Namespace) -> socket.socket:
    if args.fd is not None:
        return socket.socket(fileno=args.fd)
    if args.uds:
        if os.path.exists(args.uds):
            os.unlink(args.uds)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.uds)
    else:
        # IPPROTO_TCP, so asyncio turns Nagle off on each connection (else small writes wait 40 ms)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    sock.listen(1024)
    return sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zerostart.serve._worker", description="a zerostart worker (one model)")
    p.add_argument("--model", required=True, help="checkpoint directory or .safetensors file")
    p.add_argument("--name", help="served model name (default: the directory's name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion (tokens)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="the engine's KV cache size")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="an inherited, listening socket (set by the gateway)")
    where.add_argument("--uds", help="listen on this Unix socket path")
    where.add_argument("--port", type=int, help="listen on this TCP port")
    p.add_argument("--host", default="127.0.0.1", help="with --port")
    args = p.parse_args(argv)
    name = args.name or os.path.basename(os.path.normpath(args.model)).removesuffix(".safetensors")

    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    options = {k: v for k, v in (("max_model_len", args.max_model_len), ("kv_cache_bytes", args.kv_cache_bytes))
               if v is not None}
    loader = _Loader(args.model, name, args.device, args.dtype, options)
    loader.start()  # overlaps the load with the server's start
    if args.fd is not None:
        _watch_parent()
    sock = _socket(args)
    config = uvicorn.Config(build_app(loader, name), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=_SHUTDOWN_GRACE_S)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
