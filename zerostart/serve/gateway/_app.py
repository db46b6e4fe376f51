"""The gateway's HTTP app: OpenAI routes in front, the fleet's workers behind.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (proxied
to a worker, streamed through chunk by chunk: ``_proxy.py``), ``GET /health``, ``GET /metrics``,
``GET /zerostart/status``. Every response carries ``x-zerostart-cold-start-ms``: how long the
request waited for its model to start (0 when it was hot). This package never imports torch.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zerostart.serve._config import ServeConfig
from zerostart.serve._http import App, Bounds, Guard
from zerostart.serve.gateway._auth import Headers
from zerostart.serve.gateway._fleet import Fleet
from zerostart.serve.gateway._metrics import CONTENT_TYPE
from zerostart.serve.gateway._proxy import Proxy


def create_app(config: ServeConfig, fleet: Fleet | None = None) -> Starlette:
    """The gateway as an ASGI app; run it with uvicorn (``zerostart serve`` does, bounding its
    connections with ``serve._connections`` and ending requests at shutdown on time)."""
    fleet = fleet or Fleet(config)
    proxy = Proxy(fleet, config.server)
    gw = _Gateway(fleet, proxy)
    routes = [
        Route("/health", gw.health),
        Route("/metrics", gw.prometheus),
        Route("/zerostart/status", gw.status),
        Route("/v1/models", gw.list_models),
        Route("/v1/models/{model:path}", gw.get_model),
        Route("/v1/chat/completions", proxy.generate, methods=["POST"]),
        Route("/v1/completions", proxy.generate, methods=["POST"]),
    ]
    app = App(routes=routes, lifespan=gw.lifespan)
    app.state.fleet = gw.fleet
    s = config.server
    app.add_middleware(Guard, bounds=Bounds(s.max_body_bytes, s.body_timeout, s.request_timeout), drain=fleet.drained,
                       observe=proxy.observe)
    app.add_middleware(Headers, api_keys=tuple(s.api_keys))
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

    async def prometheus(self, request: Request) -> Response:
        return Response(self.fleet.metrics.render(), media_type=CONTENT_TYPE)

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.fleet.status())

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "zerostart"}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.fleet.names()]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.fleet.names():
            return self.proxy.error(self.proxy.unknown(name))
        return JSONResponse(self._model_card(name))
