"""Who is asking: bearer keys, the tenants they belong to, and what each tenant may call.

A **tenant** is what owns state on the server (stored responses, their ids and chains): each
key of ``server.api_keys`` is a tenant of its own, and ``server.tenants`` groups keys into named
tenants (a team, an application) that share what they store. Another tenant's stored response
is answered exactly as a missing one is.

The **admin** role reads the whole server's state: ``/zerostart/status`` and ``/metrics`` show
every model and every tenant's traffic summed (no request's content). A tenant is an admin when
the config says so (``admin: true``); a config that names no admin tenant makes every key one (a
gateway that serves one team, as before tenants). A server without keys has one tenant, an
admin: anyone who reaches it. ``/health`` and ``/ping`` are open to all (``_routes.py``).

A key comes as ``Authorization: Bearer <key>``, or as HTTP Basic's password (any user name),
which a browser asks for itself on the pages under ``browser_prefix`` (the gateway's dashboard).

    gate = Gate.for_server(config.server)
    tenant = gate.admit("/v1/responses", scope["headers"])   # Unauthorized (401) / Forbidden (403)
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
from dataclasses import dataclass
from typing import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from zerostart.serve._config import ServerConfig
from zerostart.serve.edge._app import error_response
from zerostart.serve.edge._errors import Forbidden, ServeError, Unauthorized
from zerostart.serve.edge._routes import Access, paths

TENANT = "zerostart.tenant"  # scope key: the Tenant a request comes from


@dataclass(frozen=True)
class Tenant:
    name: str  # a configured tenant's name, or "key:<hash prefix>" for a key of api_keys (never the key)
    admin: bool = False


ANYONE = Tenant("anyone", admin=True)  # the one tenant of a server without keys


def key_tenant(key: str) -> str:
    """The name of the tenant that a key of ``server.api_keys`` is on its own (safe to log)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


class Gate:
    """The keys a server takes, their tenants, and the routes that need no key or an admin."""

    def __init__(self, keys: dict[str, Tenant], *, open_paths: frozenset[str] = frozenset(),
                 admin_paths: frozenset[str] = frozenset(), browser_prefix: str | None = None,
                 refusal: Unauthorized | None = None) -> None:
        # by the key's digest: a lookup that compares digests, not secrets, takes no time that depends on them
        self._tenants = {_digest(k.encode()): t for k, t in keys.items()}
        self.open_paths = open_paths  # answered without a key
        self.admin_paths = admin_paths  # answered to admin tenants only
        self.browser_prefix = browser_prefix  # a 401 below it asks a browser for the key (HTTP Basic)
        self.refusal = refusal or Unauthorized(
            "Missing or wrong API key: send 'Authorization: Bearer <key>' with one of the keys in server.api_keys "
            "or server.tenants")
        self.tenants = sorted(set(self._tenants.values()), key=lambda t: t.name)

    @classmethod
    def for_server(cls, server: ServerConfig, *, admin_paths: frozenset[str] = frozenset(),
                   browser_prefix: str | None = None) -> "Gate":
        """The gateway's (and a cluster ingress's): its config's keys and tenants, the route
        table's access, and ``admin_paths`` of its own (the gateway's dashboard)."""
        any_admin = any(t.admin for t in server.tenants)
        keys = {k: Tenant(key_tenant(k), admin=not any_admin) for k in server.api_keys}
        for t in server.tenants:
            keys.update({k: Tenant(t.name, admin=t.admin or not any_admin) for k in t.keys})
        open_paths, admin = paths(Access.OPEN), paths(Access.ADMIN) | admin_paths
        if not server.metrics_auth:
            open_paths, admin = open_paths | {"/metrics"}, admin - {"/metrics"}
        return cls(keys, open_paths=open_paths, admin_paths=admin, browser_prefix=browser_prefix)

    def __bool__(self) -> bool:
        return bool(self._tenants)

    def tenant(self, headers: Iterable[tuple[bytes, bytes]]) -> Tenant | None:
        """The tenant of the request's key; None without one, or with a key not known here."""
        for k, v in headers:
            if k.lower() == b"authorization":
                scheme, _, token = v.partition(b" ")
                if scheme.lower() == b"bearer":
                    return self._tenants.get(_digest(token.strip()))
                if scheme.lower() == b"basic":  # user:key, base64 (RFC 7617); the user name is not checked
                    try:
                        token = base64.b64decode(token.strip(), validate=True).partition(b":")[2]
                    except (binascii.Error, ValueError):
                        return None
                    return self._tenants.get(_digest(token))
                return None
        return None

    def admit(self, path: str, headers: Iterable[tuple[bytes, bytes]]) -> Tenant:
        """The tenant a request to ``path`` comes from, if it may call it (else a
        :class:`ServeError`: 401 for a missing or unknown key, 403 for a route it may not use)."""
        if not self:
            return ANYONE
        tenant = self.tenant(headers)
        if path in self.open_paths:
            return tenant or Tenant("anonymous")
        if tenant is None:
            if self.browser_prefix is not None and path.startswith(self.browser_prefix):
                refusal = copy.copy(self.refusal)
                refusal.challenge = 'Basic realm="zerostart", charset="UTF-8"'  # the browser's own prompt
                raise refusal
            raise self.refusal
        if path in self.admin_paths and not tenant.admin:
            raise Forbidden(f"{path} shows the whole server's state: it needs a key of an admin tenant "
                            "(server.tenants[].admin); yours is a key of tenant " + repr(tenant.name))
        return tenant


def tenant_of(scope: Scope) -> Tenant:
    """The tenant of a request that passed :class:`Auth` (a server without it: :data:`ANYONE`)."""
    tenant = scope.get(TENANT, ANYONE)
    assert isinstance(tenant, Tenant)
    return tenant


class Auth:
    """ASGI middleware: every HTTP request passes :meth:`Gate.admit` (or gets its 401/403, in
    OpenAI's shape) and carries its tenant in ``scope[TENANT]``."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                scope[TENANT] = self.gate.admit(scope["path"], scope["headers"])
            except ServeError as e:
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()

