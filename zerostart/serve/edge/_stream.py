"""Streamed answers: holding a streamed request with SSE keep-alives while it waits, and a
streamed response that closes what it streams however it ends.

A streamed request that waits (for a replica of a cold model, a full queue, Ray's routing) longer
than ``stream_keepalive`` gets its headers and then an SSE comment every ``stream_keepalive``
seconds, so that proxies between it and the client keep the connection::

    hold = Hold(fleet.acquire(...), every=stream_keepalive, what=f"a replica of model {name}")
    if not await hold.ready():          # not within stream_keepalive: headers go out now
        return ClosingStream(body(hold))   # body: async for c in hold.comments(): yield c; ... hold.result()
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Generic, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # no proxy caches or buffers a stream
T = TypeVar("T")


class Hold(Generic[T]):
    """A wait that a streamed request spends, if it is long, with its headers sent (see the
    module's docstring). Whoever owns the request cancels it with :meth:`aclose` when the request
    is over; what the wait got is the awaited code's to give back (``fleet.lease`` does)."""

    def __init__(self, waiting: Awaitable[T], *, every: float, what: str) -> None:
        self.task: asyncio.Future[T] = asyncio.ensure_future(waiting)
        self.every = every
        self.what = what

    async def ready(self) -> bool:
        """Whether the wait is over within one keep-alive interval (a ``False`` sends the headers)."""
        await asyncio.wait({self.task}, timeout=self.every)
        return self.task.done()

    async def comments(self) -> AsyncIterator[bytes]:
        """An SSE comment now and every interval until the wait is over."""
        while not self.task.done():
            yield f": waiting for {self.what}\n\n".encode()
            await asyncio.wait({self.task}, timeout=self.every)

    def result(self) -> T:
        return self.task.result()

    async def aclose(self) -> None:
        """Stop waiting, and wait until the awaited code has handled that."""
        if not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


class ClosingStream(StreamingResponse):
    """A streamed response that closes its body iterator however it ends (a cancelled response
    otherwise leaves the iterator's ``finally`` to the garbage collector), so that what it
    streams from (a worker's response, a Ray generator) is closed now."""

    def __init__(self, content: AsyncIterator[bytes], **kw: Any) -> None:
        super().__init__(content, **kw)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
