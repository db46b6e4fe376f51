"""The generation routes, from the HTTP side: validate the body, acquire a replica (held while
the model is cold; a streamed request gets its headers and SSE comments meanwhile), and pass
the worker's response through byte for byte. Every response says what the request paid for a
cold start (``x-zerostart-cold-start-ms``) and for room on the replica (``x-zerostart-queue-ms``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from zerostart.serve._errors import BadRequest, ServeError, StartFailed, StartTimeout, WorkerFailed
from zerostart.serve._openai_schema import ROUTES, parse_request
from zerostart.serve.backends import UpstreamError, UpstreamResponse
from zerostart.serve.gateway._auth import COLD_START_HEADER
from zerostart.serve.gateway._fleet import Fleet
from zerostart.serve.gateway._queue import Lease

QUEUE_HEADER = "x-zerostart-queue-ms"
_EXIT_WAIT_S = 1.0  # how long a failed proxy waits for the worker's exit status, to name it
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Proxy:
    def __init__(self, fleet: Fleet, stream_keepalive: float) -> None:
        self.fleet = fleet
        self.metrics = fleet.metrics
        self.stream_keepalive = stream_keepalive

    async def generate(self, request: Request) -> Response:
        arrived = time.monotonic()
        path = request.url.path
        raw = await request.body()
        try:
            req = parse_request(ROUTES[path], raw)
        except BadRequest as e:
            return self.error(e, e.model if e.model in self.fleet.names() else "unknown")
        if req.model not in self.fleet.names():
            return self.error(self.unknown(req.model), "unknown")
        model = req.model
        acquire = asyncio.create_task(self.fleet.acquire(model, req.keep_alive_seconds))
        if req.stream:
            await asyncio.wait({acquire}, timeout=self.stream_keepalive)
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
            return self.error(e, model, cold_start_ms=_waited_ms(e, arrived))
        return await self._proxy(lease, model, path, raw, req.stream, arrived)

    async def _proxy(self, lease: Lease, model: str, path: str, raw: bytes, stream: bool, arrived: float) -> Response:
        headers = {COLD_START_HEADER: str(round(lease.cold_start_ms)), QUEUE_HEADER: str(round(lease.queue_ms))}
        try:
            upstream = await _send(lease, path, raw)
        except UpstreamError as e:
            lease.release()
            return self.error(await _worker_failed(lease, e), model, extra=headers)
        if stream and upstream.status_code == 200:
            return StreamingResponse(self._relay(lease, upstream, model, arrived), media_type="text/event-stream",
                                     headers={**headers, **_SSE_HEADERS})
        try:
            body = await upstream.aread()
        except UpstreamError as e:
            return self.error(await _worker_failed(lease, e), model, extra=headers)
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
        lease: Lease | None = None
        try:
            while not acquire.done():
                yield f": waiting for a replica of model {model}\n\n".encode()
                await asyncio.wait({acquire}, timeout=self.stream_keepalive)
            try:
                lease = acquire.result()
            except ServeError as e:
                self.metrics.requests.labels(model, str(e.status)).inc()
                yield f": {COLD_START_HEADER}={round(_waited_ms(e, arrived))}\n\n".encode()
                yield e.sse_event()
                return
            yield f": {COLD_START_HEADER}={round(lease.cold_start_ms)}\n\n".encode()
            async for chunk in self._stream_held(lease, model, path, raw, arrived):
                yield chunk
        finally:
            if not acquire.done():
                acquire.cancel()
            elif lease is None and not acquire.cancelled() and acquire.exception() is None:
                lease = acquire.result()
            if lease is not None:
                lease.release()

    async def _stream_held(self, lease: Lease, model: str, path: str, raw: bytes, arrived: float) -> AsyncIterator[bytes]:
        """A held stream's response, once it has a replica: errors become SSE events (the
        headers went out long ago)."""
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

    def unknown(self, name: str) -> ServeError:
        try:
            self.fleet.model_config(name)
        except ServeError as e:
            return e
        raise AssertionError(name)

    def error(self, e: ServeError, model: str, *, cold_start_ms: float = 0.0, extra: dict[str, str] | None = None) -> Response:
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
