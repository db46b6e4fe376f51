"""HTTP/1.1 to one worker: a small keep-alive connection pool over h11.

The gateway proxies every request through here, so this path is kept short: one idle
connection is taken (or opened), the request written, and the response handed back with its
body as an async iterator of the chunks as they arrive. A general client's pool bookkeeping
costs more than the request itself when dozens of connections are open to one worker.

Every failure of the connection surfaces as :class:`UpstreamError`, nothing else. An HTTP
server closes keep-alive connections it finds idle (uvicorn after 5 s), and that close can
cross a request sent on the connection: idle connections are not reused past
:data:`IDLE_S`, and a request whose reused connection turns out closed before a byte of the
response came back is sent once more on a new connection (the worker cannot have begun
serving it: a live server answers what it reads).
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import h11

_READ_BYTES = 65536
# Idle connections older than this are closed, not reused: below uvicorn's default keep-alive
# of 5 s, the shortest an engine's server is known to keep an idle connection.
IDLE_S = 2.0


class UpstreamError(Exception):
    """The worker could not be reached, or closed the connection mid-response."""


class _Stale(UpstreamError):
    """A reused connection was closed before any of the response arrived."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False  # it served a response before this request
        self.received = False  # bytes of the current response arrived
        self.idle_since = 0.0  # monotonic, while in the pool

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    def __init__(self, pool: "UpstreamPool", conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status_code = status
        self.headers = headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (de-chunked), until the end of the response."""
        conn = self._conn
        if conn is None:
            return
        try:
            while True:
                ev = await _next_event(conn)
                if isinstance(ev, h11.Data):
                    yield bytes(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    self._conn = None
                    self._pool._put(conn)
                    return
                else:
                    raise UpstreamError(f"unexpected {type(ev).__name__} from the worker")
        finally:
            if self._conn is not None:  # the body was not read to its end: the connection is unusable
                self._conn = None
                conn.close()

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class UpstreamPool:
    """Keep-alive connections to one worker at a Unix socket path or a TCP host and port.
    ``token``: sent as ``Authorization: Bearer <token>`` with every request (the worker
    answers only its gateway)."""

    def __init__(self, *, uds: str | None = None, host: str | None = None, port: int | None = None,
                 connect_timeout: float, token: str | None = None, idle_s: float = IDLE_S) -> None:
        if (uds is None) == (host is None or port is None):
            raise ValueError("give either uds, or host and port")
        self._uds, self._host, self._port = uds, host, port
        self._connect_timeout = connect_timeout
        self._auth = [("authorization", f"Bearer {token}")] if token else []
        self._idle_s = idle_s
        self._idle: list[_Connection] = []
        self._closed = False
        self.retries = 0  # requests sent again after their reused connection was found closed

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/json") -> UpstreamResponse:
        """Send a request; returns once the response's status and headers arrived. Raises
        :class:`UpstreamError` for anything that goes wrong with the connection."""
        headers = [("host", "worker"), ("content-type", content_type), ("content-length", str(len(body))),
                   *self._auth]
        while True:
            conn = await self._get()
            try:
                return await self._exchange(conn, h11.Request(method=method, target=path, headers=headers), body)
            except _Stale:
                self.retries += 1  # a fresh connection next (a fresh one is never stale)

    async def _exchange(self, conn: _Connection, request: h11.Request, body: bytes) -> UpstreamResponse:
        try:
            data = conn.h11.send(request)
            data += conn.h11.send(h11.Data(data=body)) if body else b""
            data += conn.h11.send(h11.EndOfMessage())
            try:
                conn.writer.write(data)
                await conn.writer.drain()
            except OSError as e:
                raise _lost(conn, e) from None
            ev = await _next_event(conn)
        except BaseException:
            conn.close()
            raise
        if not isinstance(ev, h11.Response):
            conn.close()
            raise UpstreamError(f"unexpected {type(ev).__name__} from the worker instead of a response")
        hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ev.headers}
        return UpstreamResponse(self, conn, ev.status_code, hdrs)

    async def _get(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self._idle_s and not conn.reader.at_eof() and not conn.writer.is_closing():
                conn.reused, conn.received = True, False
                return conn
            conn.close()
        try:
            if self._uds is not None:
                opening = asyncio.open_unix_connection(self._uds, limit=_READ_BYTES)
            else:
                opening = asyncio.open_connection(self._host, self._port, limit=_READ_BYTES)
            reader, writer = await asyncio.wait_for(opening, self._connect_timeout)
        except (OSError, TimeoutError) as e:
            raise UpstreamError(f"cannot connect to the worker ({type(e).__name__}: {e})") from None
        return _Connection(reader, writer)

    def _put(self, conn: _Connection) -> None:
        if self._closed or conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
            conn.close()
            return
        conn.h11.start_next_cycle()
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _lost(conn: _Connection, e: BaseException | None) -> UpstreamError:
    """The connection broke: stale (send again) if it was reused and no reply began."""
    why = f"{type(e).__name__}: {e}" if e is not None else "it was closed"
    if conn.reused and not conn.received:
        return _Stale(f"the worker had closed this idle connection ({why})")
    return UpstreamError(f"lost the connection to the worker ({why})")


async def _next_event(conn: _Connection) -> h11.Event:
    while True:
        try:
            ev = conn.h11.next_event()
        except h11.RemoteProtocolError as e:
            raise UpstreamError(f"the worker sent malformed HTTP ({e})") from None
        if ev is h11.PAUSED:
            raise UpstreamError("the worker's connection is in an unexpected state")
        if isinstance(ev, h11.Event):  # else NEED_DATA
            return ev
        try:
            data = await conn.reader.read(_READ_BYTES)
        except OSError as e:
            raise _lost(conn, e) from None
        if not data and not conn.received:
            raise _lost(conn, None)
        conn.received = True
        if not data:
            # h11 turns a close mid-body into a RemoteProtocolError at the next event
            conn.h11.receive_data(b"")
            try:
                ev = conn.h11.next_event()
            except h11.RemoteProtocolError:
                raise UpstreamError("the worker closed the connection mid-response") from None
            if not isinstance(ev, h11.Event):  # NEED_DATA or PAUSED
                raise UpstreamError("the worker closed the connection mid-response")
            return ev
        conn.h11.receive_data(data)
