"""Client connections of a uvicorn server, bounded where uvicorn bounds nothing: a request head
(request line and headers) must arrive within ``header_timeout`` of the connection opening or
of the previous response ending (else a 408 and the connection closes), and at most
``max_connections`` are open: one more first closes a connection already answered and closing
(below), else the oldest one still waiting for a request head (a slow or idle client), else it
is answered 503 and closed. So a slowloris that opens connections and trickles their heads holds
none of them long, and cannot crowd out clients that send whole requests. Bodies are bounded by
``_guard.Guard``. Malformed HTTP gets its 400 in OpenAI's JSON shape too.

Every request head is checked before h11 reads it, for what two parsers could read two ways
(a proxy in front framing a body one way and this server another lets the rest of one request
be served as a second: request smuggling). Each is a 400 and the connection closes
(RFC 9112 §6.3), where h11 alone would read on:

    Transfer-Encoding with Content-Length   h11: chunked wins, connection kept    nginx: 400
    Content-Length twice (equal values)     h11: one of them                      nginx: 400
    Content-Length twice (different)        h11: 400                              nginx: 400
    Transfer-Encoding not ending in chunked h11: 400 (as 501)                     nginx: 400/501
    Transfer-Encoding: gzip, chunked        h11: 400 (as 501)    here: 501        nginx: 501
    a header line folded (obs-fold)         h11: joined with a space              nginx: 400
    a line ending in a bare LF              h11: read as CRLF                     nginx: read as CRLF;
                                                                                  node's llhttp: 400

An idle kept-alive connection is closed by that same head timer (``header_timeout``, 10 s in
the server's defaults), not by uvicorn's keep-alive of 5 s: that equals httpx's (and so the
openai SDK's) pool expiry, and a client could send on a connection the server was closing that
instant. A connection answered before its request was read (a 413 or 408 for the body, a 400
for malformed HTTP, a 503 when every connection is busy) is not simply closed: with unread bytes
that resets it, and the client's TCP drops the answer unread. This side shuts down its half,
then reads and drops what still comes until the client closes or :data:`LINGER_S` passes
(nginx's "lingering close").

    uvicorn.Config(app, http=bounded_protocol(max_connections=1024, header_timeout=10.0))

This subclasses uvicorn's h11 protocol (its ``connection_made``, ``data_received``,
``on_response_complete``, ``timeout_keep_alive_handler``, ``transport`` and ``conn``);
tests/serve/test_serve_edge.py pins the behaviour.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 5.0  # longest a connection answered mid-request keeps dropping what the client still sends


def bounded_protocol(*, max_connections: int, header_timeout: float) -> type[H11Protocol]:
    """An HTTP/1.1 protocol class for ``uvicorn.Config(http=...)`` with these bounds."""
    return type("BoundedH11Protocol", (_Bounded,), {"max_connections": max_connections,
                                                     "header_timeout": header_timeout})


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                                 "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a request head (it takes a bare LF too)
_BARE_LF = re.compile(rb"(?<!\r)\n")


def framing_problem(head: bytes) -> tuple[int, str] | None:
    """What in a request head (its bytes to the blank line) two HTTP parsers could read two ways,
    as ``(status, why)``; None when nothing is (see the module's docstring)."""
    if _BARE_LF.search(head):
        return 400, "a line of the request head ends in a bare LF, not CRLF (RFC 9112 §2.2)"
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for line in head.split(b"\r\n")[1:]:
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            return 400, "a header line begins with whitespace: obsolete line folding (RFC 9112 §5.2) is not accepted"
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            lengths.append(value.strip())
        elif name.lower() == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",")]
    if lengths and codings:
        return 400, ("both Transfer-Encoding and Content-Length: the body's length is ambiguous, so the request is "
                     "refused and the connection closed (RFC 9112 §6.3)")
    if len(lengths) > 1:
        return 400, f"Content-Length given {len(lengths)} times: the body's length is ambiguous (RFC 9112 §6.3)"
    if lengths and not lengths[0].isdigit():
        return 400, "Content-Length is not a number of bytes (RFC 9112 §6.3)"
    if codings and codings[-1] != b"chunked":
        return 400, "Transfer-Encoding does not end in chunked: the body's length cannot be known (RFC 9112 §6.3)"
    if len(codings) > 1:
        return 501, "only Transfer-Encoding: chunked is supported (no other transfer coding)"
    return None


class _Framed(h11.Connection):
    """h11's server side, with each request head checked by :func:`framing_problem` before h11
    reads it; a problem raises h11's own error, which uvicorn answers (``send_400_response``)."""

    problem: tuple[int, str] | None = None

    def next_event(self) -> Any:
        if self.their_state is h11.IDLE and self.problem is None:
            data, _ = self.trailing_data
            end = _HEAD_END.search(data)
            if end is not None and (problem := framing_problem(data[: end.end()])) is not None:
                self.problem = problem
                raise h11.RemoteProtocolError(problem[1])
        return super().next_event()


class _Bounded(H11Protocol):
    max_connections: int
    header_timeout: float

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        size = self.config.h11_max_incomplete_event_size
        self.conn = _Framed(h11.SERVER, **({} if size is None else {"max_incomplete_event_size": size}))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False  # some of a request head arrived
        self._waiting_since = self.loop.time()
        self._linger_timer: asyncio.TimerHandle | None = None
        self.transport = _Lingering(transport, self)  # type: ignore[assignment]  # what uvicorn's code closes
        if len(self.connections) > self.max_connections and not self._make_room():
            self.transport.write(_raw_response(
                503, "Service Unavailable", f"this server has its {self.max_connections} connections open "
                "(server.max_connections), all of them busy; retry shortly", "too_many_connections"))
            self._linger()  # its request may be on its way
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            return  # answered and half-closed: what still comes is dropped
        super().data_received(data)
        if self._waiting_for_head():
            self._head_bytes = self._head_bytes or bool(data)
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_head():
            self._waiting_since, self._head_bytes = self.loop.time(), False
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def _make_room(self) -> bool:
        """Close another connection for this one: one answered already and lingering, else the
        oldest still waiting for a request head. False: every other one is busy."""
        others = [c for c in self.connections if isinstance(c, _Bounded) and c is not self]
        if lingering := next((c for c in others if c._linger_timer is not None), None):
            lingering.transport.raw.close()  # type: ignore[attr-defined]
            return True
        if waiting := [c for c in others if c._waiting_for_head()]:
            min(waiting, key=lambda c: c._waiting_since)._close_slow(linger=False)
            return True
        return False

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn's keep-alive timer: idle connections are closed by the head timer instead."""

    def _linger(self) -> None:
        """Close a connection the client may still be sending on: shut down this side (after the
        answer already written), drop what arrives, close at the client's end or after LINGER_S."""
        raw = self.transport.raw  # type: ignore[attr-defined]
        if self._linger_timer is not None or raw.is_closing():
            return
        if not raw.can_write_eof():
            raw.close()
            return
        self._disarm()
        raw.write_eof()
        raw.resume_reading()  # uvicorn pauses reading while a body waits unread
        self._linger_timer = self.loop.call_later(LINGER_S, raw.close)

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (uvicorn answers it in text/plain): the same answer in OpenAI's shape,
        naming what was wrong with the framing when that was it."""
        status, reason, code = 400, b"Bad Request", "bad_http"
        problem = getattr(self.conn, "problem", None)
        if problem is not None:
            status, msg = problem
            reason, code = ((b"Not Implemented", "unsupported_transfer_coding") if status == 501
                            else (reason, "bad_framing"))
        body = json.dumps({"error": {"message": f"{msg} (not HTTP/1.1 this server can read)",
                                     "type": "invalid_request_error", "param": None, "code": code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self._linger()  # what follows the malformed part may still be on its way

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_at(self._waiting_since + self.header_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._waiting_for_head():
            self._close_slow()

    def _close_slow(self, linger: bool = True) -> None:
        """Close a connection still waiting for its request head (with a 408 if a head began;
        ``linger``: so that it is read, unless the server needs the connection now)."""
        self._disarm()
        if not self._head_bytes:
            self.transport.close()
            return
        self.transport.write(_raw_response(
            408, "Request Timeout", f"the request line and headers did not arrive within "
            f"server.header_timeout ({self.header_timeout:g} s), or the server needed the connection",
            "header_timeout"))
        if linger:
            self._linger()
        else:
            self.transport.raw.close()  # type: ignore[attr-defined]


class _Lingering:
    """The transport as uvicorn's protocol and request cycle see it: ``close()`` while the client
    is still sending its request's body lingers (see the module's docstring); a second
    ``close()`` (the server shutting down) closes at once. Everything else is the transport's."""

    def __init__(self, raw: asyncio.Transport, protocol: _Bounded) -> None:
        self.raw = raw
        self._protocol = protocol

    def close(self) -> None:
        p = self._protocol
        if p._linger_timer is None and p.conn.their_state is h11.SEND_BODY:
            p._linger()
        else:
            self.raw.close()

    def is_closing(self) -> bool:
        return self._protocol._linger_timer is not None or self.raw.is_closing()

    def __getattr__(self, name: str) -> object:
        return getattr(self.raw, name)
