"""The generation routes, from the HTTP side: validate the body, acquire a replica (held while
the model is cold; a streamed request gets its headers and SSE comments meanwhile), and pass
the worker's response through byte for byte. Every response says what the request paid for a
cold start (``x-zerostart-cold-start-ms``) and for room on the replica (``x-zerostart-queue-ms``).

The request runs inside ``_http.Guard`` (body limits, client gone, ``request_timeout``, the
shutdown's drain), which ends it by cancelling it: so every lease is given back in a
``finally`` (or by the streamed response that owns it), and an upstream response is closed
with it (the worker then stops generating). ``Guard`` also counts every request once
(:meth:`Proxy.observe`).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from zerostart.serve._config import ServerConfig
from zerostart.serve._errors import BadRequest, ServeError, StartFailed, StartTimeout, WorkerFailed, WorkerReplaced
from zerostart.serve._http import STATUS, ClosingStream, error_response, pause_deadline, restart_deadline
from zerostart.serve._openai_schema import ROUTES, _Request, parse_body
from zerostart.serve.backends import UpstreamError, UpstreamResponse
from zerostart.serve.gateway._auth import COLD_START_HEADER
from zerostart.serve.gateway._fleet import Fleet
from zerostart.serve.gateway._queue import Lease

QUEUE_HEADER = "x-zerostart-queue-ms"
MODEL = "zerostart.model"  # scope key: the model a request named (for the count)
RUNG_HEADER = "x-zerostart-cold-start-rung"  # the rung the request's cold start climbed from, when it waited for one
_EXIT_WAIT_S = 1.0  # how long a failed proxy waits for the worker's exit status, to name it
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# What a worker answers when it is not where the gateway put it (parked or loading behind its back).
_NOT_AS_PUT = frozenset({"model_parked", "not_ready"})


class Proxy:
    def __init__(self, fleet: Fleet, server: ServerConfig) -> None:
        self.fleet = fleet
        self.metrics = fleet.metrics
        self.stream_keepalive = server.stream_keepalive
        self.max_sequences = server.max_sequences

    def observe(self, scope: Scope, status: str, seconds: float) -> None:
        """``Guard``'s count of every generation request, once, by model and status."""
        model = scope.get(MODEL) or "unknown"
        self.metrics.requests.labels(model, status).inc()
        if model != "unknown":
            self.metrics.request_seconds.labels(model).observe(seconds)

    async def generate(self, request: Request) -> Response:
        arrived = time.monotonic()
        path = request.url.path
        raw = await request.body()
        try:
            req = await parse_body(ROUTES[path], raw)
        except BadRequest as e:
            request.scope[MODEL] = e.model if e.model in self.fleet.names() else None
            return error_response(e, {COLD_START_HEADER: "0"})
        if req.model not in self.fleet.names():
            return error_response(self.unknown(req.model), {COLD_START_HEADER: "0"})
        request.scope[MODEL] = req.model
        if req.sequences > self.max_sequences:
            return error_response(BadRequest(
                f"this request asks for {req.sequences} sequences (its prompts times n), more than this server takes "
                f"in one request (server.max_sequences: {self.max_sequences}); send it as several requests",
                param="n"), {COLD_START_HEADER: "0"})
        pause_deadline(request.scope)  # request_timeout counts once a worker takes it (a start has start_timeout)
        if req.stream:
            return await self._streamed(request.scope, req, path, raw, arrived)
        try:
            lease = await self.fleet.acquire(req.model, req.keep_alive_seconds)
        except ServeError as e:
            return self.error(e, cold_start_ms=_waited_ms(e, arrived))
        restart_deadline(request.scope)
        try:
            return await self._whole(lease, path, raw)
        finally:
            lease.release()

    async def _whole(self, lease: Lease, path: str, raw: bytes) -> Response:
        """A response that is not streamed, read whole from the worker."""
        headers = _lease_headers(lease)
        try:
            upstream = await _send(lease, path, raw)
            try:
                body = await upstream.aread()
            finally:
                await upstream.aclose()
        except UpstreamError as e:
            return self.error(await _worker_failed(lease, e), extra=headers)
        if upstream.status_code == 200:
            lease.first_byte(streamed=False)
        elif (refused := self._distrust(lease, upstream.status_code, body)) is not None:
            return self.error(refused, extra=headers)
        return Response(body, status_code=upstream.status_code, headers=headers,
                        media_type=upstream.headers.get("content-type", "application/json"))

    async def _streamed(self, scope: Scope, req: _Request, path: str, raw: bytes, arrived: float) -> Response:
        acquire = asyncio.create_task(self.fleet.acquire(req.model, req.keep_alive_seconds))
        try:
            await asyncio.wait({acquire}, timeout=self.stream_keepalive)
        except BaseException:
            _abandon(acquire)
            raise
        if not acquire.done():
            # Headers go out now, so that proxies between us and the client keep the
            # connection; SSE comments follow until a replica is ready.
            return ClosingStream(self._held(scope, acquire, req.model, path, raw, arrived),
                                 on_close=lambda: _abandon(acquire), media_type="text/event-stream",
                                 headers={COLD_START_HEADER: "pending", **_SSE_HEADERS})
        try:
            lease = acquire.result()
        except ServeError as e:
            return self.error(e, cold_start_ms=_waited_ms(e, arrived))
        restart_deadline(scope)
        try:
            upstream = await _send(lease, path, raw)
        except UpstreamError as e:
            lease.release()
            return self.error(await _worker_failed(lease, e), extra=_lease_headers(lease))
        except BaseException:
            lease.release()
            raise
        if upstream.status_code != 200:
            try:
                body = await upstream.aread()
            except UpstreamError as e:
                return self.error(await _worker_failed(lease, e), extra=_lease_headers(lease))
            finally:
                await upstream.aclose()
                lease.release()
            refused = self._distrust(lease, upstream.status_code, body)
            if refused is not None:
                return self.error(refused, extra=_lease_headers(lease))
            return Response(body, status_code=upstream.status_code, headers=_lease_headers(lease),
                            media_type=upstream.headers.get("content-type", "application/json"))
        return ClosingStream(self._relay(scope, lease, upstream), on_close=lambda: _give_back(lease, upstream),
                             media_type="text/event-stream", headers={**_lease_headers(lease), **_SSE_HEADERS})

    async def _relay(self, scope: Scope, lease: Lease, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
        """Pass the worker's SSE bytes through as they come. Owns the lease."""
        try:
            async for chunk in upstream.aiter_raw():
                lease.first_byte(streamed=True)
                yield chunk
        except UpstreamError as e:
            scope[STATUS] = "stream_error"
            yield (await _worker_failed(lease, e)).sse_ending()
        finally:
            await _give_back(lease, upstream)  # a client that left closes the worker's stream: it stops generating

    async def _held(self, scope: Scope, acquire: asyncio.Task[Lease], model: str, path: str, raw: bytes,
                    arrived: float) -> AsyncIterator[bytes]:
        """A streamed request whose headers (200) went out while it waited for a replica: every
        error is an SSE event from here on, and counted as ``stream_error``."""
        while not acquire.done():
            yield f": waiting for a replica of model {model}\n\n".encode()
            await asyncio.wait({acquire}, timeout=self.stream_keepalive)
        try:
            lease = acquire.result()
        except ServeError as e:
            scope[STATUS] = "stream_error"
            yield f": {COLD_START_HEADER}={round(_waited_ms(e, arrived))}\n\n".encode()
            yield e.sse_ending()
            return
        restart_deadline(scope)
        try:
            yield f": {COLD_START_HEADER}={round(lease.cold_start_ms)}\n\n".encode()
            try:
                upstream = await _send(lease, path, raw)
            except UpstreamError as exc:
                scope[STATUS] = "stream_error"
                yield (await _worker_failed(lease, exc)).sse_ending()
                return
            if upstream.status_code != 200:
                try:
                    body = await upstream.aread()
                except UpstreamError as exc:
                    body = json.dumps((await _worker_failed(lease, exc)).body()).encode()
                finally:
                    await upstream.aclose()
                scope[STATUS] = "stream_error"
                refused = self._distrust(lease, upstream.status_code, body)
                yield refused.sse_ending() if refused is not None else b"data: " + body.strip() + b"\n\ndata: [DONE]\n\n"
                return
            async for chunk in self._relay(scope, lease, upstream):
                yield chunk
        finally:
            lease.release()

    def _distrust(self, lease: Lease, status: int, body: bytes) -> ServeError | None:
        """A worker that answers it is parked or not ready while the gateway has it serving
        was moved by someone else (or failed): it is replaced, and the request gets a 503 to
        retry. None for any other answer (passed on as it is)."""
        if status != 503 or _error_code(body) not in _NOT_AS_PUT:
            return None
        r = lease.replica
        why = f"it answered a request with {body[:200].decode('utf-8', 'replace')!r}, not in the state the gateway put it"
        self.fleet.lifecycle.replace(lease.model, r, why)
        return WorkerReplaced(f"the worker for model {r.name!r} (pid {r.pid}) was not in the state the gateway put it "
                              "in; it is being replaced. Retry the request", retry_after=1.0)

    def unknown(self, name: str) -> ServeError:
        try:
            self.fleet.model_config(name)
        except ServeError as e:
            return e
        raise AssertionError(name)

    def error(self, e: ServeError, *, cold_start_ms: float = 0.0, extra: dict[str, str] | None = None) -> Response:
        return error_response(e, {COLD_START_HEADER: str(round(cold_start_ms)), **(extra or {})})


def _lease_headers(lease: Lease) -> dict[str, str]:
    headers = {COLD_START_HEADER: str(round(lease.cold_start_ms)), QUEUE_HEADER: str(round(lease.queue_ms))}
    if lease.cold_start_ms > 0:
        headers[RUNG_HEADER] = lease.replica.rung
    return headers


async def _send(lease: Lease, path: str, raw: bytes) -> UpstreamResponse:
    upstream = lease.replica.upstream
    if upstream is None:
        raise UpstreamError("the worker has no address")
    return await upstream.request("POST", path, raw)


async def _give_back(lease: Lease, upstream: UpstreamResponse) -> None:
    lease.release()
    await upstream.aclose()


def _abandon(acquire: asyncio.Task[Lease]) -> None:
    """The request that started ``acquire`` is over: stop it, and give back a lease it got."""

    def settle(task: asyncio.Task[Lease]) -> None:
        if not task.cancelled() and task.exception() is None:
            task.result().release()

    acquire.cancel()
    acquire.add_done_callback(settle)


async def _worker_failed(lease: Lease, exc: Exception) -> WorkerFailed:
    r = lease.replica
    if r.failure is None:
        try:
            await asyncio.wait_for(r.exited.wait(), _EXIT_WAIT_S)
        except TimeoutError:
            return WorkerFailed(f"lost the connection to the worker for model {r.name!r} (pid {r.pid}) while serving "
                                f"this request ({exc}); retry the request")
    return WorkerFailed(r.crash_message())


def _waited_ms(e: ServeError, arrived: float) -> float:
    """A failed start still cost the requests that waited for it."""
    return (time.monotonic() - arrived) * 1000.0 if isinstance(e, (StartFailed, StartTimeout)) else 0.0


def _error_code(body: bytes) -> Any:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
