"""The gateway's HTTP app: the edge's route table answered, the fleet's workers behind.

The routes are ``serve.edge``'s table: the proxied OpenAI routes (``_proxy.py``: validated here,
answered by a worker, streamed through chunk by chunk), ``/v1/responses`` (``_responses_route.py``)
and the gateway's own (``/v1/models``, ``/health``, ``/ping``, ``/version``, ``/metrics``,
``/zerostart/status``, below), plus the dashboard's page at ``/zerostart/`` (``_dashboard.py``,
for admin keys like the status it reads). Every response carries ``x-zerostart-cold-start-ms``:
how long the request waited for its model to start (0 when it was hot). Keys, tenants and the
admin routes are the edge's ``Auth``. CORS only when ``server.cors.allow_origins`` lists origins. This package
never imports torch.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zerostart import __version__
from zerostart.serve._config import ServeConfig
from zerostart.serve.edge import (COLD_START_HEADER, ROUTE_TABLE, App, Auth, Bounds, DefaultHeaders, Gate, Guard,
                                  model_card, model_list)
from zerostart.serve.gateway import _dashboard
from zerostart.serve.gateway._fleet import Fleet
from zerostart.serve.gateway._metrics import CONTENT_TYPE
from zerostart.serve.gateway._proxy import Proxy
from zerostart.serve.gateway._responses_store import ResponseStore
from zerostart.serve.gateway._responses_route import ResponsesRoute

log = logging.getLogger("zerostart.serve")

Handler = Callable[[Request], Awaitable[Response]]


def create_app(config: ServeConfig, fleet: Fleet | None = None) -> Starlette:
    """The gateway as an ASGI app; run it with uvicorn (``zerostart serve`` does, bounding its
    connections with the edge's ``bounded_protocol`` and ending requests at shutdown on time)."""
    fleet = fleet or Fleet(config)
    s = config.server
    proxy = Proxy(fleet, s)
    gw = _Gateway(fleet, proxy)
    store = ResponseStore(s.responses_store.max_items, s.responses_store.ttl, s.responses_store.max_bytes)
    responses = ResponsesRoute(proxy, store, s.stream_keepalive)
    handlers: dict[str, Handler] = {
        "create_response": responses.create, "get_response": responses.get, "delete_response": responses.delete,
        "list_models": gw.list_models, "get_model": gw.get_model, "health": gw.health, "ping": gw.ping,
        "version": gw.version, "metrics": gw.prometheus, "status": gw.status}
    routes = [*(Route(r.path, proxy.generate if r.proxied else handlers[r.handler], methods=list(r.methods))
                for r in ROUTE_TABLE), *_dashboard.routes(s.dashboard)]
    app = App(routes=routes, lifespan=gw.lifespan)
    app.state.fleet = gw.fleet
    app.add_middleware(Guard, bounds=Bounds(s.max_body_bytes, s.body_timeout, s.request_timeout), drain=fleet.drained,
                       observe=proxy.observe)
    gate = Gate.for_server(s, admin_paths=_dashboard.paths(), browser_prefix=_dashboard.PREFIX)
    app.add_middleware(Auth, gate=gate)
    app.add_middleware(DefaultHeaders, headers={COLD_START_HEADER: "0"})
    if s.cors.allow_origins:  # outermost: preflights are answered before auth, and errors carry the headers
        app.add_middleware(CORSMiddleware, allow_origins=s.cors.allow_origins, allow_methods=s.cors.allow_methods,
                           allow_headers=s.cors.allow_headers, allow_credentials=s.cors.allow_credentials,
                           max_age=s.cors.max_age)
    if len(gate.tenants) > 1 and all(t.admin for t in gate.tenants):
        log.warning("%d tenants and none of them an admin: every key may read /zerostart/status and /metrics (the "
                    "whole server's models and traffic, no request's content); name the operators' tenant in "
                    "server.tenants with admin: true", len(gate.tenants))
    return app


class _Gateway:
    """The routes that read the fleet (the generation routes are ``_proxy.py``'s)."""

    def __init__(self, fleet: Fleet, proxy: Proxy) -> None:
        self.fleet = fleet
        self.proxy = proxy  # its error answers, counted in the metrics
        self.created = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.fleet.start()
        try:
            yield
        finally:
            await self.fleet.close()

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": len(self.fleet.names())})

    async def ping(self, request: Request) -> Response:
        return JSONResponse({})  # vLLM's (SageMaker's) liveness probe: 200 while the gateway serves

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.fleet.metrics.render(), media_type=CONTENT_TYPE)

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.fleet.status())

    def _card(self, name: str) -> dict[str, Any]:
        # max_model_len: configured, else what a replica reported (null until one has started)
        return model_card(name, self.created, root=self.fleet.model_config(name).path,
                          max_model_len=self.fleet.max_model_len(name))

    async def list_models(self, request: Request) -> Response:
        return JSONResponse(model_list(self._card(n) for n in self.fleet.names()))

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.fleet.names():
            return self.proxy.error(self.proxy.unknown(name))
        return JSONResponse(self._card(name))
