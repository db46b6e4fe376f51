"""Client connections of a uvicorn server, bounded where uvicorn bounds nothing: a request head
(request line and headers) must arrive within ``header_timeout`` of the connection opening or
of the previous response ending (else a 408 and the connection closes), and at most
``max_connections`` are open: one more first closes the oldest connection still waiting for a
request head (a slow or idle client), else it is answered 503 and closed. So a slowloris that
opens connections and trickles their heads holds none of them long, and cannot crowd out
clients that send whole requests. Bodies are bounded by ``_http.Guard``. Malformed HTTP gets its
400 in OpenAI's JSON shape too.

    uvicorn.Config(app, http=bounded_protocol(max_connections=1024, header_timeout=10.0))

This subclasses uvicorn's h11 protocol (its ``connection_made``, ``data_received``,
``on_response_complete`` and ``conn``); tests/serve/test_serve_limits.py pins the behaviour.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


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


class _Bounded(H11Protocol):
    max_connections: int
    header_timeout: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False  # some of a request head arrived
        self._waiting_since = self.loop.time()
        if len(self.connections) > self.max_connections:
            waiting = [c for c in self.connections if isinstance(c, _Bounded) and c is not self and c._waiting_for_head()]
            if not waiting:
                self.transport.write(_raw_response(
                    503, "Service Unavailable", f"this server has its {self.max_connections} connections open "
                    "(server.max_connections), all of them busy; retry shortly", "too_many_connections"))
                self.transport.close()
                return
            min(waiting, key=lambda c: c._waiting_since)._close_slow()
        self._arm()

    def data_received(self, data: bytes) -> None:
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
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (uvicorn answers it in text/plain): the same answer in OpenAI's shape."""
        body = json.dumps({"error": {"message": f"{msg} (not HTTP/1.1 this server can read)",
                                     "type": "invalid_request_error", "param": None, "code": "bad_http"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

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

    def _close_slow(self) -> None:
        """Close a connection still waiting for its request head (with a 408 if a head began)."""
        self._disarm()
        if self._head_bytes:
            self.transport.write(_raw_response(
                408, "Request Timeout", f"the request line and headers did not arrive within "
                f"server.header_timeout ({self.header_timeout:g} s), or the server needed the connection",
                "header_timeout"))
        self.transport.close()
