"""Bearer-token auth (when ``server.api_keys`` are set; ``/health`` and ``/ping`` stay open, and
``/metrics`` with ``server.metrics_auth: false``) and the cold-start header on every response,
as one ASGI middleware. A key is also taken as HTTP Basic's password (any user name), which a
browser asks for itself on the pages under ``browser_prefix`` (the dashboard)."""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zerostart.serve._errors import Unauthorized

COLD_START_HEADER = "x-zerostart-cold-start-ms"


class Headers:
    """Bearer-token auth (when keys are configured; ``/health`` stays open) and the
    cold-start header on every response."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], open_paths: frozenset[str] = frozenset({"/health"}),
                 browser_prefix: str | None = None) -> None:
        self.app = app
        self.keys = tuple(k.encode() for k in api_keys)
        self.open_paths = open_paths  # answered without a key
        self.browser_prefix = browser_prefix  # a 401 below it asks a browser for the key (HTTP Basic)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.keys and scope["path"] not in self.open_paths and not self._authorized(scope):
            err = Unauthorized("Missing or wrong API key: send 'Authorization: Bearer <key>' with one of the keys "
                               "in server.api_keys")
            challenge = "Bearer"
            if self.browser_prefix is not None and scope["path"].startswith(self.browser_prefix):
                challenge = 'Basic realm="zerostart", charset="UTF-8"'  # the browser's prompt: a key as password
            response = JSONResponse(err.body(), status_code=401,
                                    headers={COLD_START_HEADER: "0", "www-authenticate": challenge})
            await response(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == COLD_START_HEADER.encode() for k, _ in headers):
                    headers.append((COLD_START_HEADER.encode(), b"0"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)

    def _authorized(self, scope: Scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, token = v.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = token.strip()
                elif scheme.lower() == b"basic":  # user:key, base64 (RFC 7617); the user name is not checked
                    try:
                        token = base64.b64decode(token.strip(), validate=True).partition(b":")[2]
                    except (binascii.Error, ValueError):
                        return False
                else:
                    return False
                return any(hmac.compare_digest(token, key) for key in self.keys)
        return False

