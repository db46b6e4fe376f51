"""``/v1/responses``: OpenAI's Responses API, answered by a replica's chat completions.

    POST   /v1/responses        a Response (or, with ``stream``, its events), translated from and
                                to a chat completion by ``_responses.py``; kept in the store
                                (``store: false`` keeps it out) for the tenant that made it
    GET    /v1/responses/{id}   a stored Response of the caller's tenant
    DELETE /v1/responses/{id}   forget it

Another tenant's response (and so its chain: ``previous_response_id``) is a 404, exactly as a
missing one. A streamed request gets ``response.created`` and ``response.in_progress`` at once
(``x-zerostart-cold-start-ms: pending``), then SSE comments while its model is cold, a comment
``: x-zerostart-cold-start-ms=N`` once a replica takes it, then the answer's events. Whatever the replica's
backend, the chat completion is all it is asked for. The replica is taken as on every proxied
route (``Proxy.take``: held until the request is over, ``request_timeout`` from a worker taking
it).
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from zerostart.serve.backends import UpstreamError, UpstreamResponse
from zerostart.serve.control import STATS_HEADER
from zerostart.serve.edge import (COLD_START_HEADER, SSE_HEADERS, STATUS, ChatCompletionRequest, ClosingStream,
                                  ResponsesRequest, ServeError, UnknownResponse, WorkerFailed, parse_body, tenant_of)
from zerostart.serve.gateway._proxy import MODEL, Proxy, StatsTap, lease_headers, stats_of, waited_ms
from zerostart.serve.gateway._queue import Lease
from zerostart.serve.gateway._responses import EventStream, chat_request, from_chat
from zerostart.serve.gateway._responses_store import ResponseStore
from zerostart.units import format_size

_CHAT = "/v1/chat/completions"


class ResponsesRoute:
    def __init__(self, proxy: Proxy, store: ResponseStore, keepalive_s: float) -> None:
        self.proxy = proxy
        self.store = store
        self.keepalive_s = keepalive_s

    async def create(self, request: Request) -> Response:
        arrived = time.monotonic()
        scope = request.scope
        tenant = tenant_of(scope)
        try:
            req = await parse_body(ResponsesRequest, await request.body())  # a large body: off the event loop
            history: list[dict[str, Any]] = []
            if req.previous_response_id is not None:
                stored = self.store.get(tenant, req.previous_response_id)
                if stored is None:
                    raise self._not_stored(req.previous_response_id, param="previous_response_id")
                history = stored.messages()
            body, conversation = chat_request(req, history)
            raw = json.dumps(body).encode()
            chat = await parse_body(ChatCompletionRequest, raw)  # refused here, before a model starts, as chat would
            model = self.proxy.route_model(_CHAT, chat)
            scope[MODEL] = model  # for Guard's count of every request
        except ServeError as e:
            return self.proxy.error(e)
        if req.stream:
            return ClosingStream(self._stream(scope, req, model, raw, conversation), media_type="text/event-stream",
                                 headers={COLD_START_HEADER: "pending", **SSE_HEADERS})
        try:
            lease = await self.proxy.take(scope, model, req.keep_alive_seconds)
        except ServeError as e:
            return self.proxy.error(e, cold_start_ms=waited_ms(e, arrived))
        try:
            upstream = await self.proxy.send(scope, lease, _CHAT, raw)
            data = await self.proxy.read(lease, upstream)
        except WorkerFailed as e:
            return self.proxy.error(e, extra=lease_headers(lease))
        if upstream.status_code != 200:  # the replica's own error, in OpenAI's shape
            return Response(data, status_code=upstream.status_code, media_type="application/json",
                            headers=lease_headers(lease))
        lease.first_byte(streamed=False)
        self.proxy.observe_stats(lease, stats_of(upstream.headers.get(STATS_HEADER)))
        response, remembered = from_chat(req, json.loads(data))
        if req.store:
            self.store.put(tenant, response, conversation + [remembered])
        return JSONResponse(response, headers=lease_headers(lease))

    async def get(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        stored = self.store.get(tenant_of(request.scope), rid)
        if stored is None:
            return self.proxy.error(self._not_stored(rid))
        return Response(stored.response, media_type="application/json")

    async def delete(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        if not self.store.delete(tenant_of(request.scope), rid):
            return self.proxy.error(self._not_stored(rid))
        return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})

    def _not_stored(self, rid: str, param: str | None = None) -> ServeError:
        s = self.store
        return UnknownResponse(f"no stored response {rid!r}: this server keeps the last {s.max_items} responses "
                               f"({format_size(s.max_bytes)} at most) for {s.ttl_s:g} s, in memory, each for the "
                               "tenant that made it (server.responses_store)", param=param)

    async def _stream(self, scope: Scope, req: ResponsesRequest, model: str, raw: bytes,
                      conversation: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        events = EventStream(req)
        for ev in events.start():
            yield ev
        status = "200"
        try:
            hold = self.proxy.hold(scope, model, req.keep_alive_seconds)
            if not await hold.ready():
                async for comment in hold.comments():
                    yield comment
            lease = hold.result()
            yield f": {COLD_START_HEADER}={round(lease.cold_start_ms)}\n\n".encode()  # as a held proxied stream says it
            upstream = await self.proxy.send(scope, lease, _CHAT, raw)
            if upstream.status_code != 200:
                status = str(upstream.status_code)
                body = json.loads(await self.proxy.read(lease, upstream))
                err = body.get("error") if isinstance(body, dict) else None
                for ev in events.fail(str((err or {}).get("message", body)), str((err or {}).get("code"))):
                    yield ev
                return
            async for ev in self._relay(events, lease, model, upstream):
                yield ev
            closing, response, remembered = events.finish()
            if req.store:
                self.store.put(tenant_of(scope), response, conversation + [remembered])
            for ev in closing:
                yield ev
        except _Failed as e:
            status = "stream_error"
            for ev in events.fail(e.message):
                yield ev
        except ServeError as e:
            status = str(e.status)
            for ev in events.fail(e.message, e.code or "server_error"):
                yield ev
        finally:
            if status != "200":
                scope[STATUS] = status  # Guard counts it so (the stream's headers said 200)

    async def _relay(self, events: EventStream, lease: Lease, model: str,
                     upstream: UpstreamResponse) -> AsyncIterator[bytes]:
        """The chat stream's chunks in, Responses events out; raises :class:`_Failed` when it ends in an error."""
        tap, buf = StatsTap(), b""
        try:
            async for chunk in upstream.aiter_raw():
                lease.first_byte(streamed=True)
                self.proxy.observe_stats(lease, tap.feed(chunk))
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue  # comments, blank lines between events
                    try:
                        data = json.loads(line[len(b"data: "):])
                    except ValueError:
                        raise _Failed(f"model {model!r} answered with a malformed chat stream: {line[:200]!r}") from None
                    if isinstance(data, dict) and isinstance(data.get("error"), dict):
                        raise _Failed(str(data["error"].get("message")))
                    for ev in events.chunk(data):
                        yield ev
        except UpstreamError as e:  # the worker's connection failed mid-stream
            raise _Failed((await self.proxy.failed(lease, e)).message) from None


class _Failed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
