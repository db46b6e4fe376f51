"""``/v1/responses``: OpenAI's Responses API, answered by a replica's chat completions.

    POST   /v1/responses        a Response (or, with ``stream``, its events), translated from and
                                to a chat completion by ``_responses.py``; kept in the store
                                (``store: false`` keeps it out)
    GET    /v1/responses/{id}   a stored Response
    DELETE /v1/responses/{id}   forget it

A streamed request gets ``response.created`` and ``response.in_progress`` at once, then SSE
comments while its model is cold, then the answer's events. Whatever the replica's backend,
the chat completion is all it is asked for.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Scope

from zerostart.serve._errors import BadRequest, ServeError, UnknownModel
from zerostart.serve._openai_schema import ChatCompletionRequest, parse_body
from zerostart.serve.backends import UpstreamError
from zerostart.serve._http import STATUS
from zerostart.serve.gateway._proxy import MODEL, Proxy, StatsTap, stats_of
from zerostart.serve.gateway._queue import Lease
from zerostart.serve.gateway._responses import EventStream, ResponsesRequest, ResponseStore, chat_request, from_chat
from zerostart.serve.control import STATS_HEADER

_CHAT = "/v1/chat/completions"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ResponsesRoute:
    def __init__(self, proxy: Proxy, store: ResponseStore, keepalive_s: float) -> None:
        self.proxy = proxy
        self.store = store
        self.keepalive_s = keepalive_s

    async def create(self, request: Request) -> Response:
        try:
            req = await parse_body(ResponsesRequest, await request.body())  # a large body: off the event loop
            assert isinstance(req, ResponsesRequest)
            history: list[dict[str, Any]] = []
            if req.previous_response_id is not None:
                stored = self.store.get(req.previous_response_id)
                if stored is None:
                    raise self._not_stored(req.previous_response_id, param="previous_response_id")
                history = stored.messages
            try:
                body, conversation = chat_request(req, history)
            except ValueError as e:  # an input item this server cannot take
                raise BadRequest(str(e), param="input") from None
            raw = json.dumps(body).encode()
            chat = await parse_body(ChatCompletionRequest, raw)  # refused here, before a model starts, as chat would
            model = self.proxy.route_model(_CHAT, chat)
            request.scope[MODEL] = model  # for Guard's count of every request
        except ServeError as e:
            return self.proxy.error(e)
        if req.stream:
            return StreamingResponse(self._stream(request.scope, req, model, raw, conversation),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        try:
            lease = await self.proxy.fleet.acquire(model, None)
        except ServeError as e:
            return self.proxy.error(e)
        try:
            upstream = await self.proxy.upstream(lease, _CHAT, raw)
            try:
                data = await upstream.aread()
            except UpstreamError as e:
                raise await self.proxy.failed(lease, e) from None
            finally:
                await upstream.aclose()
        except ServeError as e:
            lease.release()
            return self.proxy.error(e)
        lease.release()
        if upstream.status_code != 200:  # the replica's own error, in OpenAI's shape
            return Response(data, status_code=upstream.status_code, media_type="application/json")
        lease.first_byte(streamed=False)
        self.proxy.observe_stats(lease, stats_of(upstream.headers.get(STATS_HEADER)))
        response, remembered = from_chat(req, json.loads(data))
        if req.store:
            self.store.put(response, conversation + [remembered])
        return JSONResponse(response)

    async def get(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        stored = self.store.get(rid)
        if stored is None:
            return self.proxy.error(self._not_stored(rid))
        return JSONResponse(stored.response)

    async def delete(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        if not self.store.delete(rid):
            return self.proxy.error(self._not_stored(rid))
        return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})

    def _not_stored(self, rid: str, param: str | None = None) -> ServeError:
        s = self.store
        err = UnknownModel(f"no stored response {rid!r}: this server keeps the last {s.max_items} responses for "
                           f"{s.ttl_s:g} s, in memory (server.responses_store)", param=param)
        err.code = "response_not_found"
        return err

    async def _stream(self, scope: Scope, req: ResponsesRequest, model: str, raw: bytes,
                      conversation: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        events = EventStream(req)
        for ev in events.start():
            yield ev
        lease: Lease | None = None
        status = "200"
        try:
            task = asyncio.ensure_future(self.proxy.fleet.acquire(model, None))
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=self.keepalive_s)
                    if not task.done():
                        yield f": waiting for a replica of model {model}\n\n".encode()
                lease = task.result()
            finally:
                if not task.done():
                    task.cancel()
            upstream = await self.proxy.upstream(lease, _CHAT, raw)
            try:
                if upstream.status_code != 200:
                    status = str(upstream.status_code)
                    body = json.loads(await upstream.aread())
                    err = body.get("error") if isinstance(body, dict) else None
                    for ev in events.fail(str((err or {}).get("message", body)), str((err or {}).get("code"))):
                        yield ev
                    return
                async for ev in self._relay(events, lease, model, upstream):
                    yield ev
            finally:
                await upstream.aclose()
            closing, response, remembered = events.finish()
            if req.store:
                self.store.put(response, conversation + [remembered])
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
            if lease is not None:
                lease.release()
            if status != "200":
                scope[STATUS] = status  # Guard counts it so (the stream's headers said 200)

    async def _relay(self, events: EventStream, lease: Lease, model: str, upstream: Any) -> AsyncIterator[bytes]:
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
