"""The HTTP edge on its own (issue 15): errors that never escape as text/plain nor break the
connection, body and time limits, bounded connections and how they close, and the upstream
pool's keep-alive race. Real uvicorn servers on loopback, in threads of this process. (Request
parsing: test_serve_parsing.py; socket directories: test_serve_socket_dirs.py.)"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zerostart.serve.edge import _connections as connections
from zerostart.serve.edge import bounded_protocol
from zerostart.serve.edge import BadRequest
from zerostart.serve.edge import App, Bounds, ClosingStream, Guard, pause_deadline, restart_deadline
from zerostart.serve.backends import UpstreamError, UpstreamPool

from tests.serve._helpers import ServerThread


# -- the edge: errors never escape, limits, deadlines -------------------------------------------


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a keep-alive socket and read one response (Content-Length bodies)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


class _Routes:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("a bug nobody expected")

    async def bad(self, request: Request) -> Response:
        raise BadRequest("temperature: too hot", param="temperature")

    async def ok(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "bytes": len(await request.body())})

    async def slow(self, request: Request) -> Response:
        await request.body()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.append("slow")
            raise
        return JSONResponse({})

    async def paused(self, request: Request) -> Response:
        """As the gateway does: the deadline waits while the request waits for a replica."""
        body = json.loads(await request.body())
        pause_deadline(request.scope)
        await asyncio.sleep(1.3)  # past the 1 s request_timeout, paused
        restart_deadline(request.scope)
        await asyncio.sleep(body["then"])
        return JSONResponse({"ok": True})

    async def stream(self, request: Request) -> Response:
        async def tokens():
            try:
                yield b'data: {"x": 1}\n\n'
                await asyncio.sleep(30)
            finally:
                self.cancelled.append("stream")

        return ClosingStream(tokens(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def edge():
    r = _Routes()
    app = App(routes=[Route("/boom", r.boom), Route("/bad", r.bad), Route("/ok", r.ok),
                      Route("/v1/ok", r.ok, methods=["POST"]), Route("/v1/boom", r.boom, methods=["POST"]),
                      Route("/v1/slow", r.slow, methods=["POST"]), Route("/v1/stream", r.stream, methods=["POST"]),
                      Route("/v1/paused", r.paused, methods=["POST"])])
    app.add_middleware(Guard, bounds=Bounds(max_body_bytes=1000, body_timeout=0.5, request_timeout=1.0))
    server = ServerThread(app, http=bounded_protocol(max_connections=1024, header_timeout=10))  # as the servers run
    yield server, r
    server.stop()


def test_errors_are_json_and_the_connection_stays_usable(edge) -> None:
    server, _ = edge
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        for request, status, code in [(_get("/boom"), 500, "internal_error"), (_get("/bad"), 400, None),
                                      (_get("/nowhere"), 404, "route_not_found"), (_post("/v1/boom", b"{}"), 500, "internal_error"),
                                      (_post("/ok", b""), 405, None)]:
            got, headers, body = _exchange(sock, request)
            assert got == status and headers["content-type"] == "application/json", (request, got, body)
            err = json.loads(body)["error"]
            assert err["message"] and err["code"] == code
            # ... and the next request on the same connection is served
            assert _exchange(sock, _get("/ok"))[0] == 200
    assert "a bug nobody expected" in json.loads(httpx.get(server.url + "/boom").content)["error"]["message"]


def test_body_size_and_time_limits(edge) -> None:
    server, _ = edge
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        status, headers, body = _exchange(sock, _post("/v1/ok", b"x" * 1001))
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        assert headers["connection"] == "close"  # the rest of the body is not read
    # a chunked body has no length up front: counted as it arrives
    chunks = (b"x" * 600 for _ in range(3))
    r = httpx.post(server.url + "/v1/ok", content=chunks)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/ok", content=b"x" * 1000).json()["bytes"] == 1000
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/ok HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
        t0 = time.monotonic()
        status, _, body = _exchange(sock, b"")
        assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
        assert 0.4 < time.monotonic() - t0 < 3


def test_a_413_reaches_a_client_still_sending_its_body(edge) -> None:
    """The 413 is sent once the head is read; closing with the body unread would reset the
    connection, and the client's TCP would drop the answer (an httpx ReadError, or a broken pipe
    while it sends). The server drops the rest of the body and closes once the client has it."""
    server, _ = edge
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_post("/v1/ok", b"x" * (8 * 1024 * 1024)))  # sent whole: the server keeps reading
        said = _closed_within(sock, 5)
    assert said is not None and said.startswith(b"HTTP/1.1 413") and b'"body_too_large"' in said

    async def many() -> list[int | str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            gate = asyncio.Semaphore(20)

            async def one() -> int | str:
                async with gate:
                    try:
                        return (await client.post("/v1/ok", content=b"x" * 1_000_000)).status_code
                    except httpx.TransportError as e:
                        return repr(e)

            return await asyncio.gather(*(one() for _ in range(100)))

    assert asyncio.run(many()) == [413] * 100  # each one's answer read (the reset lost most of them)


def test_a_client_that_keeps_sending_after_its_413_is_cut_off(edge, monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = edge
    monkeypatch.setattr(connections, "LINGER_S", 0.5)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/ok HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n")
        t0 = time.monotonic()
        said = b""
        with pytest.raises(OSError):  # a reset or a broken pipe, once the server stops reading
            while time.monotonic() - t0 < 5:
                sock.sendall(b"x" * 65536)
                sock.settimeout(0.01)
                try:
                    said += sock.recv(65536)
                except TimeoutError:
                    pass
                sock.settimeout(None)
                time.sleep(0.01)
    assert said.startswith(b"HTTP/1.1 413") and time.monotonic() - t0 < 3


def test_a_request_past_its_deadline_is_ended_and_its_route_cancelled(edge) -> None:
    server, routes = edge
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/slow", content=b"{}", timeout=10)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 < 3 and "slow" in routes.cancelled
    # a stream: what was sent stands, then an error event and [DONE]
    with httpx.stream("POST", server.url + "/v1/stream", content=b"{}", timeout=10) as r:
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[0] == 'data: {"x": 1}' and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert "stream" in routes.cancelled


def test_a_paused_deadline_counts_from_its_restart(edge) -> None:
    server, _ = edge
    assert httpx.post(server.url + "/v1/paused", json={"then": 0.5}, timeout=10).status_code == 200
    t0 = time.monotonic()
    late = httpx.post(server.url + "/v1/paused", json={"then": 5}, timeout=10)
    assert late.status_code == 504 and 2.0 < time.monotonic() - t0 < 4.0  # 1.3 s paused, then 1 s


def test_a_client_that_leaves_cancels_its_route(edge) -> None:
    server, routes = edge
    routes.cancelled.clear()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_post("/v1/slow", b"{}"))
        time.sleep(0.2)
    deadline = time.monotonic() + 0.7  # well before the 1 s deadline would have ended it
    while "slow" not in routes.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert routes.cancelled == ["slow"]


# -- connections: a slowloris holds nothing long -------------------------------------------------


@pytest.fixture()
def guarded():
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def hold(request: Request) -> Response:
        await asyncio.sleep(2)
        return JSONResponse({"ok": True})

    server = ServerThread(App(routes=[Route("/ok", ok), Route("/hold", hold)]),
                          http=bounded_protocol(max_connections=20, header_timeout=0.5))
    yield server
    server.stop()


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``seconds`` (None: still open)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def test_a_request_head_must_arrive_in_time(guarded) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as slow, \
            socket.create_connection(("127.0.0.1", guarded.port)) as idle:  # idle sends nothing at all
        slow.sendall(b"GET /ok HTTP/1.1\r\nhost: x\r\n")  # ... and never the blank line
        said = _closed_within(slow, 3)
        assert said is not None and said.startswith(b"HTTP/1.1 408") and b'"header_timeout"' in said
        assert _closed_within(idle, 3) == b""
    # a keep-alive connection gets the same bound for its next head
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        assert _exchange(sock, _get("/ok"))[0] == 200
        sock.sendall(b"GET /ok HT")
        assert (_closed_within(sock, 3) or b"").startswith(b"HTTP/1.1 408")


def test_an_idle_connection_is_closed_by_the_head_timer_not_uvicorn_s_keep_alive() -> None:
    """uvicorn's keep-alive (5 s by default) equals httpx's pool expiry: a client could send on a
    connection closed that instant. The head timer (header_timeout, longer) closes idle ones."""
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    server = ServerThread(App(routes=[Route("/ok", ok)]), timeout_keep_alive=0.5,
                          http=bounded_protocol(max_connections=20, header_timeout=2.0))
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            assert _exchange(sock, _get("/ok"))[0] == 200
            time.sleep(1.0)  # past uvicorn's keep-alive, within header_timeout
            assert _exchange(sock, _get("/ok"))[0] == 200
            t0 = time.monotonic()
            assert _closed_within(sock, 4) == b""
            assert 1.5 < time.monotonic() - t0 < 3
    finally:
        server.stop()


def test_malformed_http_gets_a_json_400(guarded) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"GET /ok HTTP/1.1\r\nno colon here\r\n\r\n")
        said = _closed_within(sock, 3) or b""
    head, _, body = said.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert json.loads(body)["error"]["code"] == "bad_http"
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:  # more follows: the 400 still arrives
        sock.sendall(b"GET /ok HTTP/1.1\r\nno colon here\r\n\r\n" + b"x" * (4 * 1024 * 1024))
        said = _closed_within(sock, 3) or b""
    assert said.startswith(b"HTTP/1.1 400") and b'"bad_http"' in said


def test_past_the_cap_the_oldest_waiting_connection_makes_room(guarded) -> None:
    slow = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(25)]  # 5 past the cap of 20
    try:
        for s in slow:
            s.sendall(b"GET /ok HT")
        t0 = time.monotonic()
        assert httpx.get(guarded.url + "/ok", timeout=5).status_code == 200  # still served, at once
        assert time.monotonic() - t0 < 0.4
        closed = sum(_closed_within(s, 0.01) is not None for s in slow[:6])
        assert closed >= 5  # the oldest made room for the newer ones and for the real request
    finally:
        for s in slow:
            s.close()


def test_past_the_cap_with_every_connection_busy_a_new_one_gets_503(guarded) -> None:
    async def main() -> list[int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=40), timeout=10) as client:
            busy = [asyncio.create_task(client.get(guarded.url + "/hold")) for _ in range(20)]
            await asyncio.sleep(0.5)
            with socket.create_connection(("127.0.0.1", guarded.port)) as extra:
                said = _closed_within(extra, 2)
            assert said is not None and said.startswith(b"HTTP/1.1 503") and b"too_many_connections" in said
            return [r.status_code for r in await asyncio.gather(*busy)]

    assert asyncio.run(main()) == [200] * 20  # the busy ones were left alone


# -- upstream: the keep-alive race ---------------------------------------------------------------


class _ClosesOnReuse:
    """An HTTP server that answers the first request of each connection (keep-alive) and closes
    the connection, without answering, when a second request arrives on it: the moment an idle
    close crosses a request on the wire."""

    def __init__(self) -> None:
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"ok": true}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        await reader.read(1)  # the next request begins: close instead of answering
        writer.close()


def test_a_request_on_a_connection_the_worker_closed_is_sent_again() -> None:
    async def main() -> tuple[list[int], int, int]:
        fake = _ClosesOnReuse()
        server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(host="127.0.0.1", port=port, connect_timeout=5, idle_s=60)  # would reuse every one
        statuses = []
        for _ in range(20):
            r = await pool.request("POST", "/v1/completions", b"{}")
            await r.aread()
            statuses.append(r.status_code)
        await pool.aclose()
        server.close()
        return statuses, pool.retries, fake.connections

    statuses, retries, connections = asyncio.run(main())
    assert statuses == [200] * 20 and retries == 19 and connections == 20


def test_a_fresh_connection_that_fails_is_an_upstream_error_not_a_retry() -> None:
    async def main() -> None:
        async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()  # reset, no answer

        server = await asyncio.start_server(slam, "127.0.0.1", 0)
        pool = UpstreamPool(host="127.0.0.1", port=server.sockets[0].getsockname()[1], connect_timeout=5)
        with pytest.raises(UpstreamError, match="lost the connection"):
            await pool.request("POST", "/v1/completions", b"{}")
        assert pool.retries == 0
        server.close()
        closed = UpstreamPool(host="127.0.0.1", port=server.sockets[0].getsockname()[1] if server.sockets else 1,
                              connect_timeout=5)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await closed.request("GET", "/health")

    asyncio.run(main())


def test_requests_spaced_at_the_servers_keep_alive_all_succeed() -> None:
    """The reproduction: a real uvicorn closing idle connections after its keep-alive, requests
    spaced right around it. Even with connections kept past the server's keep-alive (idle_s),
    every request succeeds (a crossed close is sent again)."""

    async def hello(request: Request) -> Response:
        return JSONResponse({"ok": True})

    server = ServerThread(App(routes=[Route("/v1/x", hello, methods=["POST"])]), timeout_keep_alive=0.2)

    async def main() -> list[int]:
        pool = UpstreamPool(host="127.0.0.1", port=server.port, connect_timeout=5, idle_s=60)
        out = []
        for i in range(16):
            r = await pool.request("POST", "/v1/x", b"{}")
            await r.aread()
            out.append(r.status_code)
            await asyncio.sleep(0.17 + 0.01 * (i % 7))  # 0.17 .. 0.23 s around the 0.2 s keep-alive
        await pool.aclose()
        return out

    try:
        assert asyncio.run(main()) == [200] * 16
    finally:
        server.stop()
