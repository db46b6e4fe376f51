"""Every answer in OpenAI's error shape, from any route and of any kind, and never an exception
escaping to the server.

- :class:`App`: a Starlette app whose errors are answered as ``{"error": {...}}`` JSON:
  ``ServeError`` with its status, ``HTTPException`` (no route, wrong method) with its own (a 404
  under ``/v1/`` names the OpenAI routes of the route table), anything else as a 500 naming it.
  An escaped exception makes uvicorn answer ``text/plain`` or close the connection, so the next
  request on it (a client's, or the gateway's pooled connection to a worker) would fail.
- :class:`DefaultHeaders`: headers every response carries unless its route set them.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zerostart.serve.edge._errors import InternalError, ServeError
from zerostart.serve.edge._routes import openai_paths

log = logging.getLogger("zerostart.serve.http")


def error_response(e: ServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers={**e.headers(), **(headers or {})})


class App(Starlette):
    """Starlette with every error answered in OpenAI's shape (see the module's docstring), and
    nothing re-raised to the server."""

    def __init__(self, **kw: Any) -> None:  # keywords only: exception_handlers is merged, never passed twice
        handlers = {HTTPException: _http_exception, ServeError: _serve_error, Exception: _unexpected,
                    **kw.pop("exception_handlers", {})}
        super().__init__(exception_handlers=handlers, **kw)

    def build_middleware_stack(self) -> ASGIApp:
        return _Boundary(super().build_middleware_stack())


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 404:
        message = f"No route {request.method} {path} on this server"
        if path.startswith("/v1/"):
            message = (f"{path} is not an OpenAI route this server has (it serves {', '.join(openai_paths())}; "
                       "docs/serve.md lists every route)")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {path}"
    else:
        message = str(exc.detail)
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": "route_not_found" if exc.status_code == 404 else None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _serve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServeError)
    return error_response(exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ServeError):
        return error_response(exc)
    return error_response(InternalError(f"internal error while serving {request.method} {request.url.path}: "
                                        f"{type(exc).__name__}: {exc} (the server's log has the traceback)"))


def not_found(method: str, path: str) -> Response:
    """The 404 :class:`App` answers for a route it does not have (for a server that routes by hand)."""
    body = {"error": {"message": f"No route {method} {path} on this server", "type": "invalid_request_error",
                      "param": None, "code": "route_not_found"}}
    return JSONResponse(body, status_code=404)


class _Boundary:
    """The outermost layer: an exception that got past the app's handlers is logged here and
    stops. A response not yet begun gets a JSON 500; one begun and not finished can only be cut
    (uvicorn closes the connection of a response left unfinished); a finished one stands, and
    its connection stays usable."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - the last place to answer; the traceback goes to the log
            log.error("%s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__, exc,
                      exc_info=exc)
            if not started:
                await (await _unexpected(Request(scope), exc))(scope, receive, send)


class DefaultHeaders:
    """ASGI middleware: ``headers`` on every response whose route did not set them."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                message = {**message, "headers": headers + [(k, v) for k, v in self.headers if k not in names]}
            await send(message)

        await self.app(scope, receive, stamped)
