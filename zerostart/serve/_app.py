"""The gateway's HTTP app: OpenAI routes in front, the fleet's workers behind.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (proxied
to a worker, streamed through chunk by chunk), ``GET /health``, ``GET /metrics``,
``GET /zerostart/status``. Every response carries ``x-zerostart-cold-start-ms``: how long the
request waited for its model to start (0 when it was hot). This module never imports torch.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zerostart.serve._config import ServeConfig
from zerostart.serve._errors import BadRequest, ServeError, StartFailed, StartTimeout, Unauthorized, WorkerFailed
from zerostart.serve._fleet import Fleet, Lease
from zerostart.serve._metrics import CONTENT_TYPE
from zerostart.serve._protocol import ROUTES, parse_request
from zerostart.serve._upstream import UpstreamError, UpstreamResponse

log = logging.getLogger("zerostart.serve")

COLD_START_HEADER = "x-zerostart-cold-start-ms"
QUEUE_HEADER = "x-zerostart-queue-ms"
_EXIT_WAIT_S = 1.0  # how long a failed proxy waits for the worker's exit status, to name it
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def create_app(config: ServeConfig, fleet: Fleet | None = None) -> Starlette:
    """The gateway as an ASGI app; run it with uvicorn (``zerostart serve`` does)."""
    gw = _Gateway(config, fleet or Fleet(config))
    routes = [
        Route("/health", gw.health),
        Route("/metrics", gw.prometheus),
        Route("/zerostart/status", gw.status),
        Route("/v1/models", gw.list_models),
        Route("/v1/models/{model:path}", gw.get_model),
        Route("/v1/chat/completions", gw.generate, methods=["POST"]),
        Route("/v1/completions", gw.generate, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan, exception_handlers={HTTPException: _http_exception})
    app.state.fleet = gw.fleet
    app.add_middleware(_Headers, api_keys=tuple(config.server.api_keys))
    return app


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"No route {request.method} {request.url.path}; the API is under /v1",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code)


class _Gateway:
    def __init__(self, config: ServeConfig, fleet: Fleet) -> None:
        self.config = config
        self.fleet = fleet
        self.metrics = fleet.metrics
        self.created = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.fleet.start()
        try:
            yield
        finally:
            await self.fleet.close()

    # -- plain routes -----------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": len(self.fleet.names())})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.fleet.status())

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "zerostart"}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.fleet.names()]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.fleet.names():
            return self._error(self._unknown(name), "unknown")
        return JSONResponse(self._model_card(name))

    def _unknown(self, name: str) -> ServeError:
        try:
            self.fleet.model_config(name)
        except ServeError as e:
            return e
        raise AssertionError(name)

    # -- generation -------------------------------------------------------------------------

    async def generate(self, request: Request) -> Response:
        arrived = time.monotonic()
        path = request.url.path
        raw = await request.body()
        try:
            req = parse_request(ROUTES[path], raw)
        except BadRequest as e:
            return self._error(e, e.model if e.model in self.fleet.names() else "unknown")
        if req.model not in self.fleet.names():
            return self._error(self._unknown(req.model), "unknown")
        model = req.model
        acquire = asyncio.create_task(self.fleet.acquire(model, req.keep_alive_seconds))
        if req.stream:
            await asyncio.wait({acquire}, timeout=self.config.server.stream_keepalive)
            if not acquire.done():
                # Headers go out now, so that proxies between us and the client keep the
                # connection; SSE comments follow until a replica is ready.
                return StreamingResponse(self._held_stream(acquire, model, path, raw, arrived),
                                         media_type="text/event-stream",
                                         headers={COLD_START_HEADER: "pending", **_SSE_HEADERS})
        elif not await _wait_unless_disconnected(request, acquire):
            self.metrics.requests.labels(model, "499").inc()
            return Response(status_code=499)  # the client is gone; nobody reads this
        try:
            lease = acquire.result()
        except ServeError as e:
            return self._error(e, model, cold_start_ms=_waited_ms(e, arrived))
        return await self._proxy(lease, model, path, raw, req.stream, arrived)

    async def _proxy(self, lease: Lease, model: str, path: str, raw: bytes, stream: bool, arrived: float) -> Response:
        headers = {COLD_START_HEADER: str(round(lease.cold_start_ms)), QUEUE_HEADER: str(round(lease.queue_ms))}
        try:
            upstream = await _send(lease, path, raw)
        except UpstreamError as e:
            lease.release()
            return self._error(await _worker_failed(lease, e), model, extra=headers)
        if stream and upstream.status_code == 200:
            return StreamingResponse(self._relay(lease, upstream, model, arrived), media_type="text/event-stream",
                                     headers={**headers, **_SSE_HEADERS})
        try:
            body = await upstream.aread()
        except UpstreamError as e:
            return self._error(await _worker_failed(lease, e), model, extra=headers)
        finally:
            await upstream.aclose()
            lease.release()
        if upstream.status_code == 200:
            lease.first_byte(streamed=False)
        self.metrics.requests.labels(model, str(upstream.status_code)).inc()
        self.metrics.request_seconds.labels(model).observe(time.monotonic() - arrived)
        return Response(body, status_code=upstream.status_code, headers=headers,
                        media_type=upstream.headers.get("content-type", "application/json"))

    async def _relay(self, lease: Lease, upstream: UpstreamResponse, model: str, arrived: float) -> AsyncIterator[bytes]:
        """Pass the worker's SSE bytes through as they come. Owns the lease."""
        status = "200"
        try:
            async for chunk in upstream.aiter_raw():
                lease.first_byte(streamed=True)
                yield chunk
        except UpstreamError as e:
            status = "stream_error"
            yield (await _worker_failed(lease, e)).sse_event()
        finally:
            await upstream.aclose()  # a client that left closes the worker's stream too: it stops generating
            lease.release()
            self.metrics.requests.labels(model, status).inc()
            self.metrics.request_seconds.labels(model).observe(time.monotonic() - arrived)

    async def _held_stream(self, acquire: asyncio.Task[Lease], model: str, path: str, raw: bytes,
                           arrived: float) -> AsyncIterator[bytes]:
        interval = self.config.server.stream_keepalive
        lease: Lease | None = None
        try:
            while not acquire.done():
                yield f": waiting for a replica of model {model}\n\n".encode()
                await asyncio.wait({acquire}, timeout=interval)
            try:
                lease = acquire.result()
            except ServeError as e:
                self.metrics.requests.labels(model, str(e.status)).inc()
                yield f": {COLD_START_HEADER}={round(_waited_ms(e, arrived))}\n\n".encode()
                yield e.sse_event()
                return
            yield f": {COLD_START_HEADER}={round(lease.cold_start_ms)}\n\n".encode()
            try:
                upstream = await _send(lease, path, raw)
            except UpstreamError as exc:
                self.metrics.requests.labels(model, "502").inc()
                yield (await _worker_failed(lease, exc)).sse_event()
                return
            if upstream.status_code != 200:
                body = await upstream.aread()
                await upstream.aclose()
                self.metrics.requests.labels(model, str(upstream.status_code)).inc()
                yield b"data: " + body.strip() + b"\n\n"
                return
            async for chunk in self._relay(lease, upstream, model, arrived):
                yield chunk
        finally:
            if not acquire.done():
                acquire.cancel()
            elif lease is None and not acquire.cancelled() and acquire.exception() is None:
                lease = acquire.result()
            if lease is not None:
                lease.release()

    def _error(self, e: ServeError, model: str, *, cold_start_ms: float = 0.0, extra: dict[str, str] | None = None) -> Response:
        self.metrics.requests.labels(model, str(e.status)).inc()
        headers = {COLD_START_HEADER: str(round(cold_start_ms)), **(extra or {}), **e.headers()}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _send(lease: Lease, path: str, raw: bytes) -> UpstreamResponse:
    upstream = lease.replica.upstream
    assert upstream is not None
    return await upstream.request("POST", path, raw)


async def _worker_failed(lease: Lease, exc: Exception) -> WorkerFailed:
    r = lease.replica
    try:
        await asyncio.wait_for(r.exited.wait(), _EXIT_WAIT_S)
    except TimeoutError:
        return WorkerFailed(f"lost the connection to the worker for model {r.name!r} (pid {r.pid}) while serving "
                            f"this request ({exc}); retry the request")
    return WorkerFailed(r.crash_message())


def _waited_ms(e: ServeError, arrived: float) -> float:
    """A failed start still cost the requests that waited for it."""
    return (time.monotonic() - arrived) * 1000.0 if isinstance(e, (StartFailed, StartTimeout)) else 0.0


async def _wait_unless_disconnected(request: Request, task: asyncio.Task[Any]) -> bool:
    """Wait for ``task``; if the client disconnects first, cancel it and return False."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return True
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, ServeError):
        pass
    else:
        task.result().release()
    return False


class _Headers:
    """Bearer-token auth (when keys are configured; ``/health`` stays open) and the
    cold-start header on every response."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.keys and scope["path"] != "/health" and not self._authorized(scope):
            err = Unauthorized("Missing or wrong API key: send 'Authorization: Bearer <key>' with one of the keys "
                               "in server.api_keys")
            response = JSONResponse(err.body(), status_code=401,
                                    headers={COLD_START_HEADER: "0", "www-authenticate": "Bearer"})
            await response(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == COLD_START_HEADER.encode() for k, _ in headers):
                    headers.append((COLD_START_HEADER.encode(), b"0"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)

    def _authorized(self, scope: Scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, token = v.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = token.strip()
                    return any(hmac.compare_digest(token, key) for key in self.keys)
        return False

