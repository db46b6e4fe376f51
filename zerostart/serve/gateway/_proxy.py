"""The model routes, from the HTTP side: validate the body, take a replica (held while the model
is cold; a streamed request gets its headers and SSE comments meanwhile), and pass the worker's
response through byte for byte. Every response says what the request paid for a cold start
(``x-zerostart-cold-start-ms``) and for room on the replica (``x-zerostart-queue-ms``).

The request runs inside the edge's ``Guard`` (body limits, client gone, ``request_timeout``, the
shutdown's drain), which ends it by cancelling it. Everything it holds (the replica's lease, a
wait for one, the worker's response) is entered in its resources (:meth:`Proxy.take`,
:meth:`Proxy.send`), which ``Guard`` closes once it is over: no route gives anything back itself,
and no exit path (an answer, an error, the client gone, a timeout, the drain) can forget to. The
worker sees its response closed and stops generating. ``Guard`` also counts every request once
(:meth:`Proxy.observe`).

The routes are the edge's proxied ones (chat and completions for generating models, embeddings
for embedding models, ``/tokenize`` and ``/detokenize`` for either; the model may be left out
when the server has only one). A route the model's backend lacks answers 501 naming both. One
rule for every route, ``/v1/responses`` included: ``request_timeout`` counts from a worker taking
the request; a wait for a replica is bounded by the model's ``start_timeout`` instead. What each
request cost the engine (the worker's ``control.RequestStats``) goes to the metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from zerostart.serve._config import ServerConfig
from zerostart.serve.backends import UpstreamError, UpstreamResponse, backend_class
from zerostart.serve.control import STATS_HEADER, RequestStats
from zerostart.serve.edge import (COLD_START_HEADER, PROXIED, SSE_HEADERS, STATUS, BadRequest, ClosingStream, Hold,
                                  NotServed, RequestBody, ServeError, StartFailed, StartTimeout, WorkerFailed,
                                  WorkerReplaced, error_response, parse_body, pause_deadline, resources,
                                  restart_deadline)
from zerostart.serve.gateway._fleet import Fleet
from zerostart.serve.gateway._queue import Lease

QUEUE_HEADER = "x-zerostart-queue-ms"
MODEL = "zerostart.model"  # scope key: the model a request named (for the count)
RUNG_HEADER = "x-zerostart-cold-start-rung"  # the rung the request's cold start climbed from, when it waited for one
_EXIT_WAIT_S = 1.0  # how long a failed proxy waits for the worker's exit status, to name it
# What a worker answers when it is not where the gateway put it (parked or loading behind its back).
_NOT_AS_PUT = frozenset({"model_parked", "not_ready"})
_BY_PATH = {r.path: r for r in PROXIED}


class Proxy:
    def __init__(self, fleet: Fleet, server: ServerConfig) -> None:
        self.fleet = fleet
        self.metrics = fleet.metrics
        self.stream_keepalive = server.stream_keepalive
        self.max_sequences = server.max_sequences

    def observe(self, scope: Scope, status: str, seconds: float) -> None:
        """``Guard``'s count of every request to a ``/v1/`` route, once, by model and status
        (``/tokenize`` and ``/detokenize``, vLLM's helpers beside the API, are not counted)."""
        if not scope["path"].startswith("/v1/"):
            return
        model = scope.get(MODEL) or "unknown"
        self.metrics.requests.labels(model, status).inc()
        if model != "unknown":
            self.metrics.request_seconds.labels(model).observe(seconds)

    # -- what a request holds ---------------------------------------------------------------

    async def take(self, scope: Scope, model: str, keep_alive: float | None) -> Lease:
        """A replica of ``model`` for the request of ``scope``, held until the request is over
        (in its resources). Its deadline waits meanwhile: ``request_timeout`` counts from a
        worker taking it (a start has ``start_timeout``)."""
        pause_deadline(scope)
        lease = await resources(scope).enter_async_context(self.fleet.lease(model, keep_alive))
        restart_deadline(scope)
        return lease

    def hold(self, scope: Scope, model: str, keep_alive: float | None) -> Hold[Lease]:
        """:meth:`take` for a streamed request, which may spend the wait with its headers sent;
        the wait ends with the request."""
        hold = Hold(self.take(scope, model, keep_alive), every=self.stream_keepalive,
                    what=f"a replica of model {model}")
        resources(scope).push_async_callback(hold.aclose)
        return hold

    async def send(self, scope: Scope, lease: Lease, path: str, raw: bytes) -> UpstreamResponse:
        """POST ``raw`` to the leased replica; the response is closed when the request is over
        (:class:`WorkerFailed` naming why it could not be sent)."""
        upstream = lease.replica.upstream
        try:
            if upstream is None:
                raise UpstreamError("the worker has no address")
            response = await upstream.request("POST", path, raw)
        except UpstreamError as e:
            raise await self.failed(lease, e) from None
        resources(scope).push_async_callback(response.aclose)
        return response

    # -- the routes -------------------------------------------------------------------------

    async def generate(self, request: Request) -> Response:
        arrived = time.monotonic()
        scope = request.scope
        path = request.url.path
        raw = await request.body()
        try:
            req = await parse_body(_BY_PATH[path].body or RequestBody, raw)
            model = self.route_model(path, req)
        except BadRequest as e:
            scope[MODEL] = e.model if e.model in self.fleet.names() else None
            return self.error(e)
        except ServeError as e:
            return self.error(e)
        scope[MODEL] = model
        try:
            self.check_sequences(req)
        except BadRequest as e:
            return self.error(e)
        if req.stream:
            return await self._streamed(scope, req, model, path, raw, arrived)
        try:
            lease = await self.take(scope, model, req.keep_alive_seconds)
        except ServeError as e:
            return self.error(e, cold_start_ms=waited_ms(e, arrived))
        return await self._whole(scope, lease, path, raw)

    def check_sequences(self, req: RequestBody) -> None:
        """A 400 for a request of more engine sequences than ``server.max_sequences``."""
        if req.sequences > self.max_sequences:
            raise BadRequest(f"this request asks for {req.sequences} sequences (its prompts times n, or its inputs), "
                             f"more than this server takes in one request (server.max_sequences: {self.max_sequences}); "
                             "send it as several requests", param=req.sequences_param)

    async def _whole(self, scope: Scope, lease: Lease, path: str, raw: bytes) -> Response:
        """A response that is not streamed, read whole from the worker."""
        headers = lease_headers(lease)
        try:
            upstream = await self.send(scope, lease, path, raw)
            body = await self.read(lease, upstream)
        except WorkerFailed as e:
            return self.error(e, extra=headers)
        if upstream.status_code == 200:
            lease.first_byte(streamed=False)
            self.observe_stats(lease, stats_of(upstream.headers.get(STATS_HEADER)))
        elif (refused := self._distrust(lease, upstream.status_code, body)) is not None:
            return self.error(refused, extra=headers)
        elif missing_route(upstream.status_code, body):
            return self.error(self.not_served(lease, path), extra=headers)
        return Response(body, status_code=upstream.status_code, headers=headers,
                        media_type=upstream.headers.get("content-type", "application/json"))

    async def _streamed(self, scope: Scope, req: RequestBody, model: str, path: str, raw: bytes,
                        arrived: float) -> Response:
        hold = self.hold(scope, model, req.keep_alive_seconds)
        if not await hold.ready():
            # Headers go out now, so that proxies between us and the client keep the
            # connection; SSE comments follow until a replica is ready.
            return ClosingStream(self._held(scope, hold, model, path, raw, arrived), media_type="text/event-stream",
                                 headers={COLD_START_HEADER: "pending", **SSE_HEADERS})
        try:
            lease = hold.result()
        except ServeError as e:
            return self.error(e, cold_start_ms=waited_ms(e, arrived))
        try:
            upstream = await self.send(scope, lease, path, raw)
            if upstream.status_code != 200:
                body = await self.read(lease, upstream)
        except WorkerFailed as e:
            return self.error(e, extra=lease_headers(lease))
        if upstream.status_code != 200:
            refused = self._distrust(lease, upstream.status_code, body)
            if refused is None and missing_route(upstream.status_code, body):
                refused = self.not_served(lease, path)
            if refused is not None:
                return self.error(refused, extra=lease_headers(lease))
            return Response(body, status_code=upstream.status_code, headers=lease_headers(lease),
                            media_type=upstream.headers.get("content-type", "application/json"))
        return ClosingStream(self._relay(scope, lease, upstream), media_type="text/event-stream",
                             headers={**lease_headers(lease), **SSE_HEADERS})

    def route_model(self, path: str, req: RequestBody) -> str:
        """The served model a request is for (:class:`UnknownModel`), if it serves ``path``
        (:class:`BadRequest` naming the route a model of its kind takes)."""
        names = self.fleet.names()
        model = req.model
        if model is None:  # /tokenize and /detokenize may leave it out, as vLLM serves one model
            if len(names) != 1:
                raise BadRequest(f"model: required; this server serves {', '.join(names)}", param="model")
            model = names[0]
        if model not in names:
            raise self.unknown(model)
        embeds = self.fleet.model_config(model).embedding is not None
        serves = _BY_PATH[path].serves if path in _BY_PATH else "generate"
        wrong: ServeError | None = None
        if embeds and serves == "generate":
            wrong = BadRequest(f"model {model!r} is an embedding model; use /v1/embeddings", param="model")
        if not embeds and serves == "embed":
            wrong = BadRequest(f"model {model!r} generates text; it is not served as an embedding model (set "
                               "`embedding:` in its config)", param="model")
        if wrong is None:  # what the model's engine lacks, said before anything starts
            cfg = self.fleet.model_config(model)
            wrong = backend_class(cfg.backend).refuse(cfg, path, req)
        if wrong is not None:
            if isinstance(wrong, BadRequest):
                wrong.model = model
            raise wrong
        return model

    def observe_stats(self, lease: Lease, stats: RequestStats | None) -> None:
        """What a replica reported the request cost its engine, into the vLLM-named metrics."""
        if stats is not None:
            self.metrics.observe_request(lease.model.name, stats, lease.dispatched - lease.arrived,
                                         time.monotonic() - lease.arrived)

    def not_served(self, lease: Lease, path: str) -> NotServed:
        backend = self.fleet.model_config(lease.replica.name).backend
        return NotServed(f"model {lease.replica.name!r} runs on the {backend} backend, which does not serve "
                         f"POST {path}", param="model")

    async def _relay(self, scope: Scope, lease: Lease, upstream: UpstreamResponse) -> AsyncIterator[bytes]:
        """Pass the worker's SSE bytes through as they come."""
        tap = StatsTap()
        try:
            async for chunk in upstream.aiter_raw():
                lease.first_byte(streamed=True)
                self.observe_stats(lease, tap.feed(chunk))  # before the last bytes go out
                yield chunk
        except UpstreamError as e:
            scope[STATUS] = "stream_error"
            yield (await self.failed(lease, e)).sse_ending()

    async def _held(self, scope: Scope, hold: Hold[Lease], model: str, path: str, raw: bytes,
                    arrived: float) -> AsyncIterator[bytes]:
        """A streamed request whose headers (200) went out while it waited for a replica: every
        error is an SSE event from here on, and counted as ``stream_error``."""
        async for comment in hold.comments():
            yield comment
        try:
            lease = hold.result()
        except ServeError as e:
            scope[STATUS] = "stream_error"
            yield f": {COLD_START_HEADER}={round(waited_ms(e, arrived))}\n\n".encode()
            yield e.sse_ending()
            return
        yield f": {COLD_START_HEADER}={round(lease.cold_start_ms)}\n\n".encode()
        try:
            upstream = await self.send(scope, lease, path, raw)
            body = await self.read(lease, upstream) if upstream.status_code != 200 else b""
        except WorkerFailed as exc:
            scope[STATUS] = "stream_error"
            yield exc.sse_ending()
            return
        if upstream.status_code != 200:
            scope[STATUS] = "stream_error"
            refused = self._distrust(lease, upstream.status_code, body)
            yield refused.sse_ending() if refused is not None else b"data: " + body.strip() + b"\n\ndata: [DONE]\n\n"
            return
        async for chunk in self._relay(scope, lease, upstream):
            yield chunk

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

    async def read(self, lease: Lease, upstream: UpstreamResponse) -> bytes:
        """A worker's whole response body (:class:`WorkerFailed` naming why it broke off)."""
        try:
            return await upstream.aread()
        except UpstreamError as e:
            raise await self.failed(lease, e) from None

    async def failed(self, lease: Lease, exc: Exception) -> WorkerFailed:
        """What to tell a client whose replica's connection failed with ``exc``."""
        r = lease.replica
        if r.failure is None:
            try:
                await asyncio.wait_for(r.exited.wait(), _EXIT_WAIT_S)
            except TimeoutError:
                return WorkerFailed(f"lost the connection to the worker for model {r.name!r} (pid {r.pid}) while "
                                    f"serving this request ({exc}); retry the request")
        return WorkerFailed(r.crash_message())

    def unknown(self, name: str) -> ServeError:
        try:
            self.fleet.model_config(name)
        except ServeError as e:
            return e
        raise AssertionError(name)

    def error(self, e: ServeError, *, cold_start_ms: float = 0.0, extra: dict[str, str] | None = None) -> Response:
        return error_response(e, {COLD_START_HEADER: str(round(cold_start_ms)), **(extra or {})})


def lease_headers(lease: Lease) -> dict[str, str]:
    headers = {COLD_START_HEADER: str(round(lease.cold_start_ms)), QUEUE_HEADER: str(round(lease.queue_ms))}
    if lease.cold_start_ms > 0:
        headers[RUNG_HEADER] = lease.replica.climb.value
    return headers


_STATS_COMMENT = f": {STATS_HEADER} ".encode()
_TAIL_BYTES = 4096  # a stream's stats comment comes last (before [DONE]) and is far shorter than this


class StatsTap:
    """Finds the stats comment a zerostart worker writes at the end of a stream (before
    ``[DONE]``), in the stream's last bytes (it may arrive split across chunks)."""

    def __init__(self) -> None:
        self._tail = b""
        self.done = False

    def feed(self, chunk: bytes) -> RequestStats | None:
        """The stats, once, when the chunk that completes them has arrived."""
        if self.done:
            return None
        self._tail = (self._tail + chunk)[-_TAIL_BYTES:]
        i = self._tail.rfind(_STATS_COMMENT)
        if i < 0:
            return None  # not yet, or a backend that does not report them
        line, newline, _ = self._tail[i + len(_STATS_COMMENT) :].partition(b"\n")
        if not newline:
            return None
        self.done = True
        return stats_of(line.decode("utf-8", "replace"))


def stats_of(text: str | None) -> RequestStats | None:
    if not text:
        return None
    try:
        return RequestStats.model_validate_json(text)
    except ValidationError:
        return None  # not ours to fail a request over


def missing_route(status: int, body: bytes) -> bool:
    """A backend's "no such route" (404/405 without an OpenAI error object: starlette's and
    FastAPI's defaults), as opposed to its own answer about the request."""
    if status not in (404, 405):
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return True
    return not (isinstance(data, dict) and isinstance(data.get("error"), dict))


def waited_ms(e: ServeError, arrived: float) -> float:
    """A failed start still cost the requests that waited for it."""
    return (time.monotonic() - arrived) * 1000.0 if isinstance(e, (StartFailed, StartTimeout)) else 0.0


def _error_code(body: bytes) -> Any:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
