"""The HTTP edge both processes share (the gateway's app and a worker's): every answer in
OpenAI's error shape, and bounds on what one request can take.

- :class:`App`: a Starlette app whose errors, from any route and of any kind, are answered as
  ``{"error": {...}}`` JSON and never escape to the server. An escaped exception makes uvicorn
  answer ``text/plain`` or close the connection, so the next request on it (a client's, or the
  gateway's pooled connection to a worker) would fail.
- :class:`Guard`: for the routes that take a body (``POST /v1/...``), one task per request that
  reads the body within its size and time limits (413, 408), then runs the route and ends it
  when the client goes away, when the request's deadline passes (504), or when a drain says
  so (503): an unfinished stream then ends with an SSE error event and ``data: [DONE]``. Ending
  means cancelling the route's task, so whatever it holds is given back in its ``finally``.
- :class:`ClosingStream`: a streamed response that closes its body iterator however it ends
  (a cancelled response otherwise leaves the iterator's ``finally`` to the garbage collector).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zerostart.serve._errors import (BodyTimeout, BodyTooLarge, InternalError, RequestTimeout, ServeError,
                                     ShuttingDown)

log = logging.getLogger("zerostart.serve.http")

ABORT = "zerostart.abort"  # scope key: why a guarded request was ended early (disconnect, timeout, drain)
DEADLINE = "zerostart.deadline"  # scope key: the request's Deadline (a route may restart it)
STATUS = "zerostart.status"  # scope key: a route's own status label for the count (e.g. stream_error)
_CLOSING_WRITE_S = 1.0  # how long the last words of an ended stream may wait for a client that does not read


def error_response(e: ServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers={**e.headers(), **(headers or {})})


# -- the app ----------------------------------------------------------------------------------


class App(Starlette):
    """Starlette with every error answered in OpenAI's shape: ``ServeError`` with its status,
    ``HTTPException`` (no route, wrong method) with its own, anything else as a 500 naming it;
    and nothing re-raised to the server (see the module's docstring)."""

    def __init__(self, **kw: Any) -> None:  # keywords only: exception_handlers is merged, never passed twice
        handlers = {HTTPException: _http_exception, ServeError: _serve_error, Exception: _unexpected,
                    **kw.pop("exception_handlers", {})}
        super().__init__(exception_handlers=handlers, **kw)

    def build_middleware_stack(self) -> ASGIApp:
        return _Boundary(super().build_middleware_stack())


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"No route {request.method} {request.url.path}; the API is under /v1",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _serve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServeError)
    return error_response(exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ServeError):
        return error_response(exc)
    return error_response(InternalError(f"internal error while serving {request.method} {request.url.path}: "
                                        f"{type(exc).__name__}: {exc} (the server's log has the traceback)"))


class _Boundary:
    """The outermost layer: an exception that got past the app's handlers is logged here and
    stops. A response not yet begun gets a JSON 500; one begun and not finished can only be cut
    (uvicorn closes the connection of a response left unfinished); a finished one stands, and
    its connection stays usable."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - the last place to answer; the traceback goes to the log
            log.error("%s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__, exc,
                      exc_info=exc)
            if not started:
                await (await _unexpected(Request(scope), exc))(scope, receive, send)


# -- guarded requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """What one request may take; None: no bound."""

    max_body_bytes: int | None = None
    body_timeout: float | None = None
    request_timeout: float | None = None  # arrival (or the route's restart) to the last byte


class Deadline:
    """When a guarded request must be over (``scope[DEADLINE]``). A route may :meth:`pause` it
    and :meth:`restart` it: the gateway pauses it while a request waits for a replica (a cold
    start is bounded by its own start_timeout) and restarts it once a worker takes the request."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.moved = asyncio.Event()

    def pause(self) -> None:
        self.at = math.inf
        self.moved.set()

    def restart(self) -> None:
        self.at = time.monotonic() + self.seconds
        self.moved.set()


def pause_deadline(scope: Scope) -> None:
    """Pause the request's deadline, if it has one (see :class:`Deadline`)."""
    if (deadline := scope.get(DEADLINE)) is not None:
        deadline.pause()


def restart_deadline(scope: Scope) -> None:
    """Restart the request's deadline, if it has one (see :class:`Deadline`)."""
    if (deadline := scope.get(DEADLINE)) is not None:
        deadline.restart()


def _guarded(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")  # vLLM's routes outside /v1 too


class Guard:
    """ASGI middleware for ``POST /v1/...`` (and ``/tokenize``, ``/detokenize``) requests (see the module's docstring).

    ``drain``: when set, requests in flight are ended with 503 ``shutting_down``.
    ``observe(scope, status, seconds)`` is called once per guarded request when it is over:
    ``status`` is the HTTP status sent (or ``scope[STATUS]`` when the route set one),
    ``499`` when the client left before its answer ended."""

    def __init__(self, app: ASGIApp, bounds: Bounds, drain: asyncio.Event | None = None,
                 observe: Callable[[Scope, str, float], None] | None = None) -> None:
        self.app = app
        self.bounds = bounds
        self.drain = drain
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not _guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        if self.bounds.request_timeout is not None:
            scope[DEADLINE] = Deadline(self.bounds.request_timeout)
        response = _Tracked(send)
        try:
            await self._run(scope, receive, response)
        finally:
            if self.observe is not None:
                status = scope.get(STATUS) or (str(response.status) if response.status else "499")
                self.observe(scope, status, time.monotonic() - arrived)

    async def _run(self, scope: Scope, receive: Receive, response: _Tracked) -> None:
        try:
            body = await _read_body(scope, receive, self.bounds)
        except (BodyTooLarge, BodyTimeout) as e:
            # the rest of the body is not read: the connection closes after this answer
            await error_response(e, {"connection": "close"})(scope, receive, response.send)
            return
        except _ClientGone:
            return
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        task = asyncio.ensure_future(self.app(scope, _replay(body, gone), response.send))  # a task: ASGI apps are coroutines
        try:
            reason = await self._until_over(task, gone, scope.get(DEADLINE))
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if reason is None:
            task.result()  # a route's exception goes on to the boundary
            return
        scope[ABORT] = reason
        if reason == "disconnect":
            if not response.finished:
                scope[STATUS] = "499"  # the client left before its answer ended
            return
        err = ShuttingDown("the server is shutting down; this request ran past server.shutdown_timeout; retry it") \
            if reason == "drain" else RequestTimeout(
                f"the request ran past server.request_timeout ({self.bounds.request_timeout:g} s) and was ended; "
                "ask for fewer tokens or raise the timeout")
        await response.end_with(err, scope, receive)

    async def _until_over(self, task: asyncio.Future[None], gone: asyncio.Event,
                          deadline: Deadline | None) -> str | None:
        """None once the route is done; else why it has to end now."""
        waits: dict[asyncio.Future[Any], str] = {asyncio.ensure_future(gone.wait()): "disconnect"}
        if self.drain is not None:
            waits[asyncio.ensure_future(self.drain.wait())] = "drain"
        try:
            while True:
                moved = asyncio.ensure_future(deadline.moved.wait()) if deadline is not None else None
                timeout = None if deadline is None or math.isinf(deadline.at) else max(0.0, deadline.at - time.monotonic())
                done, _ = await asyncio.wait({task, *waits, *([moved] if moved else [])}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if moved is not None:
                    moved.cancel()
                if task in done:
                    return None
                if hit := [waits[w] for w in done if w in waits]:
                    return hit[0]
                if deadline is not None and deadline.moved.is_set():
                    deadline.moved.clear()  # restarted: wait for the new deadline
                    continue
                return "timeout"
        finally:
            for w in waits:
                w.cancel()


class _ClientGone(Exception):
    pass


class _Tracked:
    """The ``send`` of a guarded request, remembering what went out."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0
        self.sse = False
        self.finished = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                           for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def end_with(self, err: ServeError, scope: Scope, receive: Receive) -> None:
        """Answer ``err`` in whatever shape is still possible."""
        if not self.status:
            await error_response(err)(scope, receive, self.send)
            return
        if self.finished:
            return
        if not self.sse:  # half a JSON body cannot be mended: the connection is cut
            raise RuntimeError(f"{err.message} (its response had begun, and was cut)")
        scope[STATUS] = "stream_error"
        async with asyncio.timeout(_CLOSING_WRITE_S):
            await self.send({"type": "http.response.body", "body": err.sse_ending(), "more_body": False})


async def _read_body(scope: Scope, receive: Receive, bounds: Bounds) -> bytes:
    limit = bounds.max_body_bytes
    if limit is not None:
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                raise BodyTooLarge(_too_large(int(v), limit))
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(bounds.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if limit is not None and size > limit:
                    raise BodyTooLarge(_too_large(size, limit, more=message.get("more_body", False)))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within server.body_timeout ({bounds.body_timeout:g} s; "
                          f"{size} bytes came)") from None


def _too_large(size: int, limit: int, more: bool = False) -> str:
    return (f"the request body is {'over ' if more else ''}{size} bytes, more than this server takes "
            f"(server.max_body_bytes: {limit}); send fewer or shorter prompts")


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


def _replay(body: bytes, gone: asyncio.Event) -> Receive:
    """A ``receive`` that gives the body read ahead, then waits for the client to leave."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


class ClosingStream(StreamingResponse):
    """A streamed response that closes its body iterator however it ends, so the iterator's
    ``finally`` (giving back a lease, cancelling a generation) runs now, not when collected;
    then ``on_close`` (for what the iterator holds before it first runs: an iterator closed
    before its start runs none of its code)."""

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], Any] | None = None,
                 **kw: Any) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            try:
                if close is not None:
                    await close()
            finally:
                if self._on_close is not None and inspect.isawaitable(done := self._on_close()):
                    await done
