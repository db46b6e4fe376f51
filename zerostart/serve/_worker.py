"""A worker process: holds one model and speaks the OpenAI API, plus control routes.

Started by the gateway with a listening socket already bound (``--fd``)::

    python -m zerostart.serve._worker --fd 5 --model SOURCE --name NAME [--device cpu] [--dtype bfloat16]
                                      [--images off|use|write] [--parkable]
    python -m zerostart.serve._worker --fd 5 --standby [--device cuda]

or on its own, for a direct comparison, ``zerostart coldstart`` or debugging::

    python -m zerostart.serve._worker --model SOURCE (--port 8001 [--host 127.0.0.1] | --uds /tmp/w.sock)

It serves HTTP at once and loads the model in the background (``_holder.py`` has the worker's
states), so the gateway can ask how the load is going. Routes (their JSON is in docs/serve.md):

- ``GET /zerostart/ready?wait=SECONDS``: long poll; 200 ``standby`` / ``ready`` / ``parked``,
  503 while ``starting`` / ``loading`` / ``parking`` / ``waking``, 500 ``failed``.
- ``GET /zerostart/phases``: the latest cold start's phases (the load, or the latest wake),
  relative to ``origin_unix`` (the moment this process began running Python code of ours).
- ``POST /zerostart/load``: a standby worker becomes a worker of the model named in the body.
- ``POST /zerostart/park``, ``POST /zerostart/wake``: weights to host RAM and back.
- ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``.
"""

import time

_ORIGIN = time.perf_counter()  # everything before this line is the gateway's "spawn" phase
_ORIGIN_UNIX = time.time()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from typing import Any, AsyncIterator  # noqa: E402

from pydantic import BaseModel, ConfigDict, ValidationError  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.types import ASGIApp, Receive, Scope, Send  # noqa: E402

from zerostart.serve._holder import Busy, Holder, LoadSpec, NotParkable  # noqa: E402
from zerostart.names import DTYPES, IMAGE_MODES, Dtype, ImageMode, normalize_device  # noqa: E402
from zerostart.serve._config import default_name  # noqa: E402

log = logging.getLogger("zerostart.serve.worker")

_ORPHAN_GRACE_S = 10.0  # after the gateway is gone: time to shut down cleanly before a hard exit
_SHUTDOWN_GRACE_S = 5  # on SIGTERM: how long open requests (and an image being written) may take to finish
_GENERATE = frozenset({"/v1/chat/completions", "/v1/completions"})


def _error(status: int, message: str, code: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                                   "param": None, "code": code}, **extra}, status_code=status)


class LoadRequest(BaseModel):
    """The body of ``POST /zerostart/load``; nulls take the worker's command-line values."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    name: str | None = None
    device: str | None = None
    dtype: Dtype | None = None
    images: ImageMode | None = None
    parkable: bool | None = None
    engine_options: dict[str, Any] = {}


class _Tracker:
    """Counts the OpenAI requests in flight (until their last byte is sent), so that a park can
    refuse while any is. While the model is parked they are refused; while it wakes they wait."""

    def __init__(self, app: ASGIApp, holder: Holder) -> None:
        self.app, self.holder = app, holder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        h = self.holder
        if scope["type"] != "http" or scope["path"] not in _GENERATE:
            await self.app(scope, receive, send)
            return
        while h.state == "waking" or h.paused:
            await (h.wait_settled(60.0) if h.state == "waking" else h.wait_unpaused(60.0))
        if h.state in ("parking", "parked"):
            name = h.spec.name if h.spec is not None else "?"
            msg = (f"model {name!r} is {h.state} (its weights are in host memory); "
                   "POST /zerostart/wake first")
            await _error(503, msg, "model_parked")(scope, receive, send)
            return
        rid = h.begin_request(scope["method"], scope["path"])  # no await since the state check: a park sees it
        try:
            await self.app(scope, receive, send)
        finally:
            h.end_request(rid)


def build_app(holder: Holder, name: str, defaults: LoadSpec | None = None) -> Starlette:
    def served_name() -> str:
        return holder.spec.name if holder.spec is not None and holder.spec.name else name

    def not_ready() -> Response:
        name = served_name()
        msg = (f"model {name!r} failed to load: {holder.error}" if holder.state == "failed"
               else f"model {name!r} is not ready (state: {holder.state}, phase: {holder.phase})")
        return _error(503, msg, "not_ready")

    async def ready(request: Request) -> Response:
        try:
            wait = float(request.query_params.get("wait", "0"))
        except ValueError:
            wait = 0.0
        await holder.wait_settled(wait)
        body = holder.ready_json(os.getpid())
        status = {"standby": 200, "ready": 200, "parked": 200, "failed": 500}.get(holder.state, 503)
        return JSONResponse(body, status_code=status)

    async def phases(request: Request) -> Response:
        return JSONResponse(holder.phases_json())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": holder.state}, status_code=200 if holder.state != "failed" else 500)

    async def load(request: Request) -> Response:
        try:
            req = LoadRequest.model_validate_json(await request.body() or b"{}")
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "body"
            return _error(400, f"{where}: {err['msg']}", "bad_request")
        if holder.state != "standby":
            return _error(409, f"this worker is {holder.state}; only a waiting standby worker (--standby) takes "
                          "/zerostart/load", "not_standby")
        from zerostart.engine import EngineConfig, EngineError

        try:
            EngineConfig(**req.engine_options)
        except (TypeError, EngineError) as e:
            return _error(400, f"engine_options: {e} (EngineConfig fields: "
                          f"{', '.join(f.name for f in dataclasses.fields(EngineConfig))})", "bad_request")
        d = defaults or LoadSpec(model="", name="")
        try:
            device = normalize_device(req.device) if req.device else d.device
        except ValueError as e:
            return _error(400, f"device: {e}", "bad_request")
        model = req.model or d.model
        if not model:
            return _error(400, "model: required (this standby worker was started without --model)", "bad_request")
        spec = LoadSpec(model=model, name=req.name or (d.name if model == d.model and d.name else default_name(model)),
                        device=device, dtype=req.dtype if req.dtype is not None else d.dtype,
                        images=req.images or d.images, parkable=d.parkable if req.parkable is None else req.parkable,
                        engine_options={**d.engine_options, **req.engine_options})
        if holder.standby_device and spec.device != holder.standby_device and not (
                spec.device == "cuda" and holder.standby_device.startswith("cuda")):
            log.warning("standby worker initialized %s; loading on %s pays its device init", holder.standby_device,
                        spec.device)
        holder.load(spec)
        return JSONResponse({"state": "loading", "model": spec.model, "name": spec.name}, status_code=202)

    async def park(request: Request) -> Response:
        if holder.state == "parked":
            return JSONResponse({"state": "parked", "changed": False})
        try:
            holder.begin_park()
            return JSONResponse(await asyncio.to_thread(holder.park))
        except Busy as e:
            busy = holder.in_flight_json()
            what = "; ".join(f"{r['method']} {r['path']} (id {r['id']}, {r['age_s']:.1f} s)" for r in busy)
            return _error(409, f"cannot park model {served_name()!r}: {e}" + (f": {what}" if what else ""), "busy",
                          in_flight=busy)
        except NotParkable as e:
            code = "not_parkable" if holder.state == "ready" else "not_ready"
            return _error(409, f"cannot park model {served_name()!r}: {e}", code)
        except Exception as e:  # noqa: BLE001 - the worker is now failed; the gateway stops it
            return _error(500, f"parking model {served_name()!r} failed: {type(e).__name__}: {e}", "park_failed")

    async def wake(request: Request) -> Response:
        if holder.state == "waking":  # another wake is under way: answer when it is done
            await holder.wait_settled(600.0)
        if holder.state == "ready":
            return JSONResponse({"state": "ready", "changed": False})
        try:
            requested = holder.begin_wake()
        except NotParkable as e:
            return _error(409, f"cannot wake model {served_name()!r}: {e}", "not_ready")
        try:
            return JSONResponse(await asyncio.to_thread(holder.wake, requested))
        except Exception as e:  # noqa: BLE001 - the worker is now failed; the gateway stops it
            return _error(500, f"waking model {served_name()!r} failed: {type(e).__name__}: {e}", "wake_failed")

    def served(route: str):
        async def handler(request: Request) -> Response:
            if holder.state != "ready":
                return not_ready()
            return await getattr(holder.routes, route)(request)

        return handler

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if holder.engine is not None:
            holder.engine.stop()
        await asyncio.to_thread(holder.close, _SHUTDOWN_GRACE_S)

    app = Starlette(lifespan=lifespan, routes=[
        Route("/zerostart/ready", ready),
        Route("/zerostart/phases", phases),
        Route("/zerostart/load", load, methods=["POST"]),
        Route("/zerostart/park", park, methods=["POST"]),
        Route("/zerostart/wake", wake, methods=["POST"]),
        Route("/health", health),
        Route("/v1/models", served("models")),
        Route("/v1/chat/completions", served("chat"), methods=["POST"]),
        Route("/v1/completions", served("completions"), methods=["POST"]),
    ])
    app.add_middleware(_Tracker, holder=holder)
    return app


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
    p.add_argument("--model", help="model directory, .safetensors file, ready image, hf://org/name, s3://... or "
                                   "https://... (with --standby: the default for /zerostart/load)")
    p.add_argument("--standby", action="store_true",
                   help="import and initialize the device, then wait for POST /zerostart/load")
    p.add_argument("--reserve", type=int, default=0, metavar="BYTES",
                   help="with --standby on cpu: fault in this much host memory while waiting; the model's "
                        "weights are read straight into it (default 0: none)")
    p.add_argument("--name", help="served model name (default: the model directory's name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=DTYPES)
    # The gateway always passes the model's setting (default: names.DEFAULT_IMAGE_MODE); a worker
    # started by hand touches no image store unless asked.
    p.add_argument("--images", default="off", choices=IMAGE_MODES,
                   help="ready images: off, use (restore a matching one), write (use, and write one after a "
                        "load from the source); default off")
    p.add_argument("--parkable", action="store_true", help="load so that the model can be parked (CUDA: VMM memory)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion (tokens)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="the engine's KV cache size")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="an inherited, listening socket (set by the gateway)")
    where.add_argument("--uds", help="listen on this Unix socket path")
    where.add_argument("--port", type=int, help="listen on this TCP port")
    p.add_argument("--host", default="127.0.0.1", help="with --port")
    args = p.parse_args(argv)
    if not args.model and not args.standby:
        p.error("--model is required (or --standby, to wait for POST /zerostart/load)")
    if args.reserve < 0:
        p.error(f"--reserve must be >= 0 bytes, got {args.reserve}")
    if args.reserve and not args.standby:
        p.error("--reserve applies to a standby worker (--standby): a worker that loads at once gains nothing from it")

    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    options = {k: v for k, v in (("max_model_len", args.max_model_len), ("kv_cache_bytes", args.kv_cache_bytes))
               if v is not None}
    name = args.name or (default_name(args.model) if args.model else "")
    spec = LoadSpec(model=args.model or "", name=name, device=args.device, dtype=args.dtype, images=args.images,
                    parkable=args.parkable, engine_options=options)
    holder = Holder(_ORIGIN, _ORIGIN_UNIX)
    if args.standby:
        holder.start_standby(args.device, reserve=args.reserve)
    else:
        holder.start(spec)  # overlaps the load with the server's start
    if args.fd is not None:
        _watch_parent()
    sock = _socket(args)
    config = uvicorn.Config(build_app(holder, name or "standby", spec), log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=_SHUTDOWN_GRACE_S)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
