"""The OpenAI ingress: the HTTP face of a zerostart cluster, one Ray Serve deployment.

It is the same edge as one machine's gateway (``zerostart.serve.edge``): the same keys, tenants
and admin routes, the same request bodies and model cards, the same holding. It validates a
request, finds the model's pool, and calls that pool's engine-replica deployment with the model
as the multiplexed model id, so Ray routes it to a replica that already holds the model, and
holds it (bounded by ``max_queued_requests``) while the pool is at zero. The response streams
back chunk by chunk. While a streamed request waits, SSE comments keep its connection open.
``/v1/responses`` is not served here: its store lives in one gateway process.

Failures, each answered in OpenAI's error shape:
  Ray's queue for the pool is full        429 queue_full, Retry-After
  the pool's deployment is unavailable    503, Retry-After
  the replica died mid-request            502 worker_exited (mid-stream: an SSE error event)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from zerostart import __version__
from zerostart.cluster._asgi import Head
from zerostart.serve import load_config
from zerostart.serve.edge import (COLD_START_HEADER, ROUTES, SSE_HEADERS, TENANT, BadRequest, ClosingStream,
                                  Gate, Hold, NotServed, QueueFull, ServeError, UnknownModel, WorkerFailed,
                                  error_response, model_card, model_list, not_found, parse_request)

log = logging.getLogger("zerostart.cluster")

WAIT_HEADER = "x-zerostart-cluster-wait-ms"  # arrival at the ingress -> the replica's first byte of the response
_BUSY_RETRY_S = 1.0  # Retry-After when Ray's queue for a pool is full
_UNAVAILABLE_RETRY_S = 5.0  # Retry-After when a pool's deployment is unavailable
_PASS_HEADERS = ("authorization", "content-type", "user-agent")


_RAY_FAILURES = (BackPressureError, DeploymentUnavailableError, RayActorError)


def _cancel(parts: Any) -> None:
    """Stop a request's stream on its replica (Ray cancels the replica's generator)."""
    try:
        parts.cancel()
    except _RAY_FAILURES:  # Ray re-raises why the request never reached a replica: nothing to cancel
        pass


class ServiceUnavailable(ServeError):
    status = 503
    code = "pool_unavailable"


class Ingress:
    """The deployment class (``serve.deployment`` is applied by ``_app.build``)."""

    def __init__(self, config: dict[str, Any], pools: dict[str, list[str]], engines: list[Any],
                 directory: Any) -> None:
        cfg = load_config(data=config)
        self.config = cfg
        self.app_name = cfg.cluster.app_name
        self.keepalive = cfg.server.stream_keepalive
        self.gate = Gate.for_server(cfg.server)
        self.pool_of = {model: pool for pool, models in pools.items() for model in models}
        self.engines = dict(zip(pools, engines))
        self.directory = directory
        self.created = int(time.time())

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        try:
            request.scope[TENANT] = self.gate.admit(path, request.scope["headers"])
        except ServeError as e:
            return self._error(e)
        if request.method == "POST" and path in ROUTES:
            return await self.generate(request, path)
        if request.method == "GET":
            if path == "/health":
                return JSONResponse({"status": "ok", "models": len(self.pool_of)})
            if path == "/ping":
                return JSONResponse({})
            if path == "/version":
                return JSONResponse({"version": __version__})
            if path == "/v1/models":
                return JSONResponse(model_list(self._card(m) for m in self.pool_of))
            if path.startswith("/v1/models/"):
                name = path.removeprefix("/v1/models/")
                return JSONResponse(self._card(name)) if name in self.pool_of else self._error(self._unknown(name))
            if path == "/zerostart/status":
                return JSONResponse(await self.status())
            if path == "/metrics":
                return Response(await self.directory.metrics.remote(), media_type="text/plain; version=0.0.4")
        if path == "/v1/responses" or path.startswith("/v1/responses/"):
            return self._error(NotServed(f"{request.method} {path} is not served on a Ray cluster: the store of "
                                         "responses lives in one gateway process (zerostart serve)"))
        return not_found(request.method, path)

    # -- generation -------------------------------------------------------------------------

    async def generate(self, request: Request, path: str) -> Response:
        arrived = time.monotonic()
        raw = await request.body()
        try:
            req = parse_request(ROUTES[path], raw)
        except BadRequest as e:
            return self._error(e)
        pool = self.pool_of.get(req.model)
        if pool is None:
            return self._error(self._unknown(req.model))
        headers = [(k, v) for k, v in request.headers.items() if k in _PASS_HEADERS]
        handle = self.engines[pool].options(multiplexed_model_id=req.model, stream=True)
        parts = handle.generate.remote(path, raw, headers)
        first = Hold(parts.__anext__(), every=self.keepalive, what=f"a replica of model {req.model}")
        if req.stream and not await first.ready():
            return ClosingStream(self._held(parts, first, req.model, arrived), media_type="text/event-stream",
                                 headers={COLD_START_HEADER: "pending", **SSE_HEADERS})
        try:
            head = await first.task
        except _RAY_FAILURES as e:
            _cancel(parts)
            return self._error(self._failed(e, req.model, pool))
        except asyncio.CancelledError:
            _cancel(parts)
            raise
        assert isinstance(head, Head), head
        out = dict(head.headers)
        out.pop("content-length", None)
        out[WAIT_HEADER] = str(round((time.monotonic() - arrived) * 1000.0))
        if req.stream:
            return ClosingStream(self._rest(parts, req.model), status_code=head.status, headers=out)
        try:  # a whole response is small: read it here, so that a replica dying before its end is a 502
            body = b"".join([chunk async for chunk in parts])
        except RayActorError as e:
            return self._error(self._failed(e, req.model, pool))
        return Response(body, status_code=head.status, headers=out)

    async def _rest(self, parts: Any, model: str) -> AsyncIterator[bytes]:
        """The body after the head; a replica that dies mid-stream ends it with an SSE error event."""
        try:
            async for chunk in parts:
                yield chunk
        except RayActorError as e:
            yield self._failed(e, model, self.pool_of[model]).sse_event()
        finally:
            _cancel(parts)  # a client that left stops the replica's stream, and the worker's generation

    async def _held(self, parts: Any, first: Hold[Any], model: str, arrived: float) -> AsyncIterator[bytes]:
        try:
            async for comment in first.comments():
                yield comment
            try:
                head = first.result()
            except _RAY_FAILURES as e:
                yield self._failed(e, model, self.pool_of[model]).sse_event()
                return
            yield f": {WAIT_HEADER}={round((time.monotonic() - arrived) * 1000.0)}\n\n".encode()
            if head.status == 200:
                async for chunk in self._rest(parts, model):
                    yield chunk
                return
            # a held stream already answered 200: an error body goes out as one data event
            body = b"".join([chunk async for chunk in self._rest(parts, model)])
            yield b"data: " + body.strip() + b"\n\n"
        finally:
            await first.aclose()
            _cancel(parts)

    def _failed(self, e: Exception, model: str, pool: str) -> ServeError:
        if isinstance(e, BackPressureError):
            return QueueFull(f"Too many requests are waiting for pool {pool!r} (model {model!r}); its "
                             "max_queued_requests is reached. Retry later.", retry_after=_BUSY_RETRY_S)
        if isinstance(e, DeploymentUnavailableError):
            return ServiceUnavailable(f"Pool {pool!r} (model {model!r}) is unavailable on the Ray cluster ({e}); "
                                      "retry later", retry_after=_UNAVAILABLE_RETRY_S)
        return WorkerFailed(f"The replica of pool {pool!r} serving model {model!r} died during this request "
                            f"({type(e).__name__}); Ray replaces it: retry the request")

    # -- the rest -------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        out = await self.directory.status.remote()
        app = (await asyncio.to_thread(serve.status)).applications.get(self.app_name)
        deployments = {} if app is None else app.deployments
        out["pools"] = {pool: {"models": sorted(m for m, p in self.pool_of.items() if p == pool),
                               "status": str(deployments[pool].status.value) if pool in deployments else "missing",
                               "replica_states": dict(deployments[pool].replica_states) if pool in deployments else {}}
                        for pool in self.engines}
        return {"mode": "ray", **out}

    def _card(self, name: str) -> dict[str, Any]:
        m = self.config.model(name)
        return model_card(name, self.created, root=m.path, max_model_len=m.max_model_len, pool=self.pool_of[name])

    def _unknown(self, name: str) -> UnknownModel:
        return UnknownModel(f"The model {name!r} does not exist; served models: {', '.join(sorted(self.pool_of))}",
                            param="model")

    def _error(self, e: ServeError) -> Response:
        return error_response(e, {COLD_START_HEADER: "0"})
