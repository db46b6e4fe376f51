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
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zerostart.serve._config import ServeConfig
from zerostart.serve.gateway._auth import Headers
from zerostart.serve.gateway._fleet import Fleet
from zerostart.serve.gateway._metrics import CONTENT_TYPE
from zerostart.serve.gateway._proxy import Proxy


def create_app(config: ServeConfig, fleet: Fleet | None = None) -> Starlette:
    """The gateway as an ASGI app; run it with uvicorn (``zerostart serve`` does)."""
    fleet = fleet or Fleet(config)
    proxy = Proxy(fleet, config.server.stream_keepalive)
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
    app = Starlette(routes=routes, lifespan=gw.lifespan, exception_handlers={HTTPException: _http_exception})
    app.state.fleet = gw.fleet
    app.add_middleware(Headers, api_keys=tuple(config.server.api_keys))
    return app


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"No route {request.method} {request.url.path}; the API is under /v1",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code)


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
            return self.proxy.error(self.proxy.unknown(name), "unknown")
        return JSONResponse(self._model_card(name))
