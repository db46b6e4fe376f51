"""The gateway's dashboard: a page at ``/zerostart/`` that polls ``/zerostart/status`` and draws
the fleet on the cold ladder, each device's memory budget (hot and parked shares), the latest
cold starts as phase waterfalls, and the request and cold-start rates.

Three static files in ``dashboard/`` beside this module, served from the package as they are:
no build step, nothing from a CDN, no cookie. It sits behind an admin's key, as the status it
reads: a browser asks for one with its own login prompt (HTTP Basic: any user name, a key as
the password; the edge's ``Gate``), and sends it with the page's requests for the status. Off with
``server.dashboard: false``.
"""

from __future__ import annotations

import importlib.resources

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

PREFIX = "/zerostart/"  # the page's address; every file of it, and the status it reads, sit below it
_FILES = {"": ("index.html", "text/html; charset=utf-8"), "dashboard.js": ("dashboard.js", "text/javascript"),
          "dashboard.css": ("dashboard.css", "text/css")}
# The page's own files and its status requests only: no inline script, no other origin, no frames.
_HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
            "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                       "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                                       "frame-ancestors 'none'"}


def paths() -> frozenset[str]:
    """The dashboard's addresses: the whole server's state, for admin keys (as the status it reads)."""
    return frozenset({PREFIX.rstrip("/"), *(PREFIX + name for name in _FILES)})


def routes(enabled: bool) -> list[BaseRoute]:
    """The dashboard's routes; when it is off, one that says so."""
    if not enabled:
        return [Route(PREFIX.rstrip("/"), _off), Route(PREFIX, _off),
                *(Route(PREFIX + name, _off) for name in _FILES if name)]
    return [Route(PREFIX.rstrip("/"), _to_page), *(Route(PREFIX + name, _file) for name in _FILES)]


async def _to_page(request: Request) -> Response:
    return RedirectResponse(PREFIX, status_code=308)  # relative URLs in the page resolve below /zerostart/


async def _file(request: Request) -> Response:
    name, media_type = _FILES[request.url.path.removeprefix(PREFIX)]
    body = importlib.resources.files("zerostart.serve.gateway").joinpath("dashboard", name).read_bytes()
    return Response(body, media_type=media_type, headers=_HEADERS)


async def _off(request: Request) -> Response:
    return JSONResponse({"error": {"message": "the dashboard is off on this server (server.dashboard: false); "
                                              "GET /zerostart/status has the same numbers",
                                   "type": "invalid_request_error", "param": None, "code": "dashboard_off"}},
                        status_code=404)
