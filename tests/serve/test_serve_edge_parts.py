"""The edge's parts on their own: one route table that the gateway answers and the 404 names,
keys and tenants (who may call what), what a request holds given back on every exit path by
``Guard`` (its resources), holding with keep-alives, and text decoded once (a lone surrogate is
a 400 naming its field). Real uvicorn servers on loopback, in threads of this process."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
import pytest
import safetensors.torch
import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zerostart.serve import create_app, load_config
from zerostart.serve.edge import (ANYONE, PROXIED, ROUTE_TABLE, App, BadRequest, Bounds, ChatCompletionRequest,
                                  ClosingStream, EmbeddingRequest, Forbidden, Gate, Guard, Hold, ResponsesRequest,
                                  Tenant, Unauthorized, key_tenant, openai_paths, parse_request, resources)

from tests.serve._helpers import ServerThread

# -- one route table ------------------------------------------------------------------------------


def test_the_gateway_answers_every_route_of_the_table_and_the_404_names_them(tmp_path) -> None:
    from starlette.testclient import TestClient

    ckpt = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4)}, str(ckpt))
    app = create_app(load_config(data={"models": [{"path": str(ckpt)}]}))
    served = {(r.path, m) for r in app.routes for m in getattr(r, "methods", None) or ()}
    assert {(r.path, m) for r in ROUTE_TABLE for m in r.methods} <= served
    assert {r.path for r in PROXIED} == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize",
                                         "/detokenize"}
    with TestClient(app) as client:
        err = client.post("/v1/nope", json={}).json()["error"]
        assert err["code"] == "route_not_found"
        assert all(p in err["message"] for p in openai_paths()) and "/v1/responses" in err["message"]


# -- keys, tenants, the admin role -------------------------------------------------------------


def _h(key: str | None) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())] if key else []


def test_each_key_or_configured_tenant_is_a_tenant_and_admins_are_named() -> None:
    server = load_config(data={"server": {"api_keys": ["k1", "k2"], "tenants": [
        {"name": "ops", "keys": ["root"], "admin": True}, {"name": "team", "keys": ["t1", "t2"]}]}}).server
    gate = Gate.for_server(server)
    one, two = gate.admit("/v1/models", _h("k1")), gate.admit("/v1/models", _h("k2"))
    assert one != two and one.name == key_tenant("k1") and "k1" not in one.name and not one.admin
    assert gate.admit("/v1/models", _h("t1")) == gate.admit("/v1/models", _h("t2")) == Tenant("team")
    assert gate.admit("/zerostart/status", _h("root")) == Tenant("ops", admin=True)
    for path in ("/zerostart/status", "/metrics"):
        with pytest.raises(Forbidden, match="admin"):
            gate.admit(path, _h("t1"))
    for headers in ([], _h("nope"), [(b"authorization", b"Basic k1")]):
        with pytest.raises(Unauthorized):
            gate.admit("/v1/models", headers)
    assert not gate.admit("/health", []).admin and not gate.admit("/ping", _h("nope")).admin  # open, as no one


def test_with_no_admin_named_every_key_is_one_and_without_keys_anyone_is() -> None:
    gate = Gate.for_server(load_config(data={"server": {"api_keys": ["k1", "k2"]}}).server)
    assert gate.admit("/zerostart/status", _h("k1")).admin and gate.admit("/metrics", _h("k2")).admin
    assert Gate.for_server(load_config(data={}).server).admit("/zerostart/status", []) is ANYONE
    open_metrics = Gate.for_server(load_config(data={"server": {"api_keys": ["k"], "tenants": [
        {"name": "ops", "keys": ["root"], "admin": True}], "metrics_auth": False}}).server)
    assert open_metrics.admit("/metrics", []) and pytest.raises(Forbidden, open_metrics.admit, "/zerostart/status",
                                                                 _h("k"))


def test_tenant_config_is_checked() -> None:
    for bad, word in [({"api_keys": ["a"], "tenants": [{"name": "t", "keys": ["a"]}]}, "more than once"),
                      ({"tenants": [{"name": "t", "keys": ["a"]}, {"name": "t", "keys": ["b"]}]}, "unique"),
                      ({"tenants": [{"name": "t", "keys": []}]}, "keys"),
                      ({"tenants": [{"name": "t", "keys": ["a b"]}]}, "whitespace")]:
        with pytest.raises(ValueError, match=word):
            load_config(data={"server": bad})
    # tenants authenticate a server reachable from other machines as api_keys do
    assert load_config(data={"server": {"host": "0.0.0.0", "tenants": [{"name": "t", "keys": ["a"]}]}})


# -- what a request holds is given back on every exit path ---------------------------------------


class _Held:
    """A resource requests take, counting what is out."""

    def __init__(self) -> None:
        self.out = 0
        self.taken = 0

    @asynccontextmanager
    async def take(self) -> AsyncIterator[None]:
        self.out += 1
        self.taken += 1
        try:
            yield
        finally:
            self.out -= 1


@pytest.fixture(scope="module")
def holding():
    held = _Held()
    drain = asyncio.Event()

    async def route(request: Request) -> Response:
        body = json.loads(await request.body())
        await resources(request.scope).enter_async_context(held.take())
        if body["how"] == "error":
            raise RuntimeError("a route that fails")
        if body["how"] == "drain":
            drain.set()
        if body["how"] == "stream":
            async def tokens() -> AsyncIterator[bytes]:
                yield b"data: 1\n\n"
                await asyncio.sleep(30)

            return ClosingStream(tokens(), media_type="text/event-stream")
        if body["how"] != "ok":
            await asyncio.sleep(30)
        return JSONResponse({"ok": True})

    app = App(routes=[Route("/v1/x", route, methods=["POST"]), Route("/v1/y", route, methods=["POST"])])
    app.add_middleware(Guard, bounds=Bounds(request_timeout=1.0), drain=drain)
    server = ServerThread(app)
    yield server, held, drain
    server.stop()


def test_guard_gives_back_what_a_request_holds_however_it_ends(holding) -> None:
    server, held, drain = holding

    def settled(n: int) -> None:
        deadline = time.monotonic() + 5
        while (held.out, held.taken) != (0, n) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (held.out, held.taken) == (0, n)

    assert httpx.post(server.url + "/v1/x", json={"how": "ok"}).status_code == 200
    settled(1)
    assert httpx.post(server.url + "/v1/x", json={"how": "error"}).status_code == 500
    settled(2)
    r = httpx.post(server.url + "/v1/x", json={"how": "hang"}, timeout=10)  # past request_timeout
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    settled(3)
    for how in ("hang", "stream"):  # the client leaves, before and after the answer began
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            body = json.dumps({"how": how}).encode()
            sock.sendall(b"POST /v1/x HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            while held.out == 0:
                time.sleep(0.01)
            if how == "stream":
                assert b"data: 1" in sock.recv(65536)
        settled(4 if how == "hang" else 5)
    r = httpx.post(server.url + "/v1/y", json={"how": "drain"}, timeout=10)  # the shutdown's drain
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    settled(6)


def test_resources_outside_guard_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="outside Guard"):
        resources({"type": "http", "method": "GET", "path": "/v1/models"})


# -- holding a streamed request ------------------------------------------------------------------


def test_hold_sends_comments_until_the_wait_is_over_and_stops_it_when_asked() -> None:
    async def main() -> None:
        ready = asyncio.get_running_loop().create_future()
        hold = Hold(ready, every=0.05, what="a replica of model m")
        assert not await hold.ready()
        comments = hold.comments()
        assert await comments.__anext__() == b": waiting for a replica of model m\n\n"
        ready.set_result(7)
        assert [c async for c in comments] == [] and hold.result() == 7
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stopped = Hold(never, every=0.05, what="x")
        await stopped.aclose()
        assert stopped.task.cancelled()

    asyncio.run(main())


# -- text is decoded once, at the edge -----------------------------------------------------------


@pytest.mark.parametrize("schema, body, where", [
    (ChatCompletionRequest, '{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    (EmbeddingRequest, '{"model": "m", "input": ["ok", "\\udfff"]}', "input[1]"),
    (ResponsesRequest, '{"model": "m", "input": "x", "metadata": {"k\\ud800": "v"}}', "metadata.k\\ud800"),
    (ChatCompletionRequest, '{"model": "\\uDBFF", "messages": []}', "model"),
])
def test_a_lone_surrogate_is_a_400_naming_its_field(schema: Any, body: str, where: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_request(schema, body.encode())
    assert e.value.message.startswith(f"{where}: contains a lone UTF-16 surrogate"), e.value.message
    JSONResponse(e.value.body())  # the answer itself is valid text (it once failed to encode: a 500)
    # a pair is one character, and fine
    ok = parse_request(ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}')
    assert ok.messages[0].content == "\U0001F600"
