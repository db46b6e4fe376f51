"""The gateway's HTTP app: OpenAI routes in front, the fleet's workers behind.

Routes: ``GET /v1/models``; ``POST /v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/tokenize``, ``/detokenize`` (proxied to a worker, streamed through chunk
by chunk: ``_proxy.py``); ``/v1/responses`` (``_responses_route.py``); ``GET /health``,
``/ping``, ``/version``, ``/metrics``, ``/zerostart/status``, and the dashboard's page at
``/zerostart/`` (``_dashboard.py``). Every response carries
``x-zerostart-cold-start-ms``: how long the request waited for its model to start (0 when it
was hot). CORS only when ``server.cors.allow_origins`` lists origins. This package never
imports torch.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zerostart import __version__
from zerostart.serve._config import ServeConfig
from zerostart.serve._http import App, Bounds, Guard
from zerostart.serve._openai_schema import ROUTES
from zerostart.serve.gateway import _dashboard
from zerostart.serve.gateway._auth import Headers
from zerostart.serve.gateway._fleet import Fleet
from zerostart.serve.gateway._metrics import CONTENT_TYPE
from zerostart.serve.gateway._proxy import Proxy
from zerostart.serve.gateway._responses import ResponseStore
from zerostart.serve.gateway._responses_route import ResponsesRoute


def create_app(config: ServeConfig, fleet: Fleet | None = None) -> Starlette:
    """The gateway as an ASGI app; run it with uvicorn (``zerostart serve`` does, bounding its
    connections with ``serve._connections`` and ending requests at shutdown on time)."""
    fleet = fleet or Fleet(config)
    s = config.server
    proxy = Proxy(fleet, s)
    gw = _Gateway(fleet, proxy)
    store = ResponseStore(s.responses_store.max_items, s.responses_store.ttl)
    responses = ResponsesRoute(proxy, store, s.stream_keepalive)
    routes = [
        Route("/health", gw.health),
        Route("/ping", gw.ping, methods=["GET", "POST"]),
        Route("/version", gw.version),
        Route("/metrics", gw.prometheus),
        Route("/zerostart/status", gw.status),
        Route("/v1/models", gw.list_models),
        Route("/v1/models/{model:path}", gw.get_model),
        Route("/v1/responses", responses.create, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses.get, methods=["GET"]),
        Route("/v1/responses/{response_id}", responses.delete, methods=["DELETE"]),
        *(Route(path, proxy.generate, methods=["POST"]) for path in ROUTES),
        *_dashboard.routes(s.dashboard),
    ]
    app = App(routes=routes, lifespan=gw.lifespan, exception_handlers={HTTPException: _http_exception})
    app.state.fleet = gw.fleet
    app.add_middleware(Guard, bounds=Bounds(s.max_body_bytes, s.body_timeout, s.request_timeout), drain=fleet.drained,
                       observe=proxy.observe)
    open_paths = frozenset({"/health", "/ping"} | (set() if s.metrics_auth else {"/metrics"}))
    app.add_middleware(Headers, api_keys=tuple(s.api_keys), open_paths=open_paths, browser_prefix=_dashboard.PREFIX)
    if s.cors.allow_origins:  # outermost: preflights are answered before auth, and errors carry the headers
        app.add_middleware(CORSMiddleware, allow_origins=s.cors.allow_origins, allow_methods=s.cors.allow_methods,
                           allow_headers=s.cors.allow_headers, allow_credentials=s.cors.allow_credentials,
                           max_age=s.cors.max_age)
    return app


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 404:
        message = f"No route {request.method} {path} on this server"
        if path.startswith("/v1/"):
            message = (f"{path} is not an OpenAI route this server has (it serves /v1/chat/completions, "
                       "/v1/completions, /v1/embeddings, /v1/responses, /v1/models; docs/serve.md lists every route)")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {path}"
    else:
        message = str(exc.detail)
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": "route_not_found" if exc.status_code == 404 else None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


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

    def _model_card(self, name: str) -> dict[str, Any]:
        # root and parent as vLLM (the source; no base model); max_model_len: configured, else what
        # a replica reported (null until one has started, when the engine picks it)
        cfg = self.fleet.model_config(name)
        return {"id": name, "object": "model", "created": self.created, "owned_by": "zerostart", "root": cfg.path,
                "parent": None, "max_model_len": self.fleet.max_model_len(name)}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.fleet.names()]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.fleet.names():
            return self.proxy.error(self.proxy.unknown(name))
        return JSONResponse(self._model_card(name))
