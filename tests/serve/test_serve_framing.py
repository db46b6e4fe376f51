"""HTTP/1.1 framing (RFC 9112 §2.2, §5.2, §6.3): a request head that two parsers could read two
ways (a proxy in front and this server) is refused with a 400 (501 for a transfer coding this
server lacks) and its connection closed, so that nothing after it on the connection is read as
another request. h11 alone read on: Content-Length with Transfer-Encoding (chunked won, the
connection stayed open and the bytes after the chunked body were served as a second request),
equal duplicate Content-Lengths, folded header lines and bare LFs. A real uvicorn server with
the edge's protocol, on loopback."""

from __future__ import annotations

import json
import re
import socket

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zerostart.serve.edge import App, bounded_protocol
from zerostart.serve.edge._connections import framing_problem

from tests.serve._helpers import ServerThread

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
_STATUS_LINE = re.compile(rb"HTTP/1\.1 \d{3} [A-Za-z ]*\r\n")  # a response's first line (not the text of a message)


@pytest.fixture(scope="module")
def server():
    seen: list[str] = []

    async def route(request: Request) -> Response:
        seen.append(request.url.path)
        return JSONResponse({"path": request.url.path, "body": (await request.body()).decode()})

    app = App(routes=[Route("/{path:path}", route, methods=["GET", "POST"])])
    s = ServerThread(app, http=bounded_protocol(max_connections=64, header_timeout=10))
    yield s, seen
    s.stop()


def _all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(10)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _send(server: ServerThread, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw)
        return _all(sock)


CASES = [
    ("content-length and chunked", 400, b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 44\r\n"
     b"transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + SMUGGLED, "both Transfer-Encoding and Content-Length"),
    ("content-length twice, equal", 400, b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok"
     + SMUGGLED, "Content-Length given 2 times"),
    ("content-length twice, different", 400, b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
     b"content-length: 40\r\n\r\nok" + SMUGGLED, "Content-Length given 2 times"),
    ("content-length as a list", 400, b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2, 2\r\n\r\nok" + SMUGGLED,
     "not a number"),
    ("transfer-encoding not ending in chunked", 400, b"POST /a HTTP/1.1\r\nhost: x\r\n"
     b"transfer-encoding: chunked, identity\r\n\r\n2\r\nok\r\n0\r\n\r\n" + SMUGGLED, "does not end in chunked"),
    ("transfer-encoding gzip, chunked", 501, b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
     b"2\r\nok\r\n0\r\n\r\n" + SMUGGLED, "only Transfer-Encoding: chunked"),
    ("transfer-encoding in two headers", 400, b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
     b"transfer-encoding: identity\r\n\r\n2\r\nok\r\n0\r\n\r\n" + SMUGGLED, "does not end in chunked"),
    ("obs-fold", 400, b"POST /a HTTP/1.1\r\nhost: x\r\nx-note: one\r\n two\r\ncontent-length: 2\r\n\r\nok" + SMUGGLED,
     "obsolete line folding"),
    ("obs-fold hiding transfer-encoding", 400, b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nx-note: a\r\n"
     b"\ttransfer-encoding: chunked\r\n\r\nok" + SMUGGLED, "obsolete line folding"),
    ("bare LF", 400, b"POST /a HTTP/1.1\nhost: x\ncontent-length: 2\n\nok" + SMUGGLED, "bare LF"),
    ("bare LF in one header line", 400, b"POST /a HTTP/1.1\r\nhost: x\nx-a: 1\r\ncontent-length: 2\r\n\r\nok" + SMUGGLED,
     "bare LF"),
]


@pytest.mark.parametrize("name, status, raw, why", CASES, ids=[c[0] for c in CASES])
def test_ambiguous_framing_is_refused_and_the_connection_closed(server, name: str, status: int, raw: bytes,
                                                                why: str) -> None:
    srv, seen = server
    before = list(seen)
    answer = _send(srv, raw)  # returns once the server closed the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert len(_STATUS_LINE.findall(answer)) == 1  # one answer: nothing after it was read as a request
    assert b"connection: close" in head.lower()
    err = json.loads(body)["error"]
    assert why in err["message"] and err["code"] in ("bad_framing", "unsupported_transfer_coding"), err
    assert seen == before  # the route never ran: not for this request, not for the smuggled one


def test_well_framed_requests_are_still_served_on_one_connection(server) -> None:
    srv, seen = server
    chunked = b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    sized = b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
    answer = _send(srv, chunked + sized)
    assert _STATUS_LINE.findall(answer) == [b"HTTP/1.1 200 OK\r\n"] * 2, answer
    assert seen[-2:] == ["/a", "/b"]


def test_framing_problem_reads_only_the_head() -> None:
    ok = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Folded-Looking: a b\r\n\r\n"
    assert framing_problem(ok) is None
    assert framing_problem(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") is None
    assert framing_problem(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n") is None  # names and codings: any case
    assert framing_problem(b"POST / HTTP/1.1\r\nCONTENT-LENGTH: 1\r\nTransfer-Encoding: chunked\r\n\r\n") is not None
