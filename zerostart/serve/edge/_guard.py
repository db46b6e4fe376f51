"""Bounds on what one request can take, and an end for every request: ``Guard``.

For the routes that take a body (``POST /v1/...`` and the route table's others), ``Guard`` runs
one task per request that reads the body within its size and time limits (413, 408), then runs
the route and ends it when the client goes away, when the request's deadline passes (504), or
when a drain says so (503): an unfinished stream then ends with an SSE error event and
``data: [DONE]``. Ending means cancelling the route's task.

What a request holds (a replica's lease, a queue ticket, an upstream response) it holds in its
:func:`resources`: an exit stack that ``Guard`` closes once the route's task is over, whatever
ended it (its answer sent, an error, the client gone, ``request_timeout``, the shutdown's
drain). So a route never releases anything itself, and no exit path can forget to.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zerostart.serve.edge._app import error_response
from zerostart.serve.edge._errors import BodyTimeout, BodyTooLarge, RequestTimeout, ServeError, ShuttingDown
from zerostart.serve.edge._routes import BODY_PATHS

ABORT = "zerostart.abort"  # scope key: why a guarded request was ended early (disconnect, timeout, drain)
DEADLINE = "zerostart.deadline"  # scope key: the request's Deadline (a route may restart it)
STATUS = "zerostart.status"  # scope key: a route's own status label for the count (e.g. stream_error)
RESOURCES = "zerostart.resources"  # scope key: the request's AsyncExitStack (see resources())
_CLOSING_WRITE_S = 1.0  # how long the last words of an ended stream may wait for a client that does not read


def resources(scope: Scope) -> AsyncExitStack:
    """What the request of ``scope`` holds, given back when it is over (see the module's
    docstring): ``await resources(scope).enter_async_context(fleet.lease(...))``."""
    stack = scope.get(RESOURCES)
    if not isinstance(stack, AsyncExitStack):
        raise RuntimeError(f"{scope.get('method')} {scope.get('path')} takes resources outside Guard, which gives "
                           "them back: it must run inside it (a POST route of the route table)")
    return stack


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
    return path.startswith("/v1/") or path in BODY_PATHS  # vLLM's /tokenize, /detokenize outside /v1 too


class Guard:
    """ASGI middleware for ``POST /v1/...`` requests and the route table's other bodies (see the module's docstring).

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
        scope[RESOURCES] = held = AsyncExitStack()
        try:
            await self._run(scope, receive, response)
        finally:
            await held.aclose()  # (already closed unless this task itself was cancelled)
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
        task = asyncio.ensure_future(self.app(scope, replay(body, gone), response.send))  # a task: ASGI apps are coroutines
        try:
            reason = await self._until_over(task, gone, scope.get(DEADLINE))
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await scope[RESOURCES].aclose()  # the route is over: what it held goes back before any last words
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


def replay(body: bytes, gone: asyncio.Event) -> Receive:
    """A ``receive`` that gives ``body`` (read ahead, or all there is) as one message, then waits
    until ``gone`` is set to say the client left: how a request whose body is already read is
    handed to an ASGI app (here, and by the cluster's replicas, which call the gateway's app)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive
