"""The worker's HTTP app: the OpenAI routes over its engine, and the control routes the gateway
drives it with (their bodies are typed in ``serve/control.py``; docs/serve.md has the JSON):

- ``GET /zerostart/ready?wait=SECONDS``: long poll; 200 ``standby`` / ``ready`` / ``parked``,
  503 while ``starting`` / ``loading`` / ``parking`` / ``waking``, 500 ``failed``.
- ``GET /zerostart/phases``: the latest cold start's phases (the load, or the latest wake),
  relative to ``origin_unix`` (the moment this process began running Python code of ours).
- ``POST /zerostart/load``: a standby worker becomes a worker of the model its body (a
  ``LoadSpec``) names.
- ``POST /zerostart/park``, ``POST /zerostart/wake``: weights to host RAM and back.
- ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
  ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``, ``GET /health``.

Started by a gateway (``ZEROSTART_WORKER_TOKEN`` set), every route answers only requests that
carry that token (``Authorization: Bearer <token>``): 401 for anyone else on the host.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from zerostart.serve.control import (ErrorBody, ErrorDetail, InFlight, LoadAccepted, LoadSpec, ParkResult, WakeResult,
                                     WorkerState)
from zerostart.serve.edge import PROXIED, App, Auth, Bounds, Gate, Guard, Tenant, Unauthorized
from zerostart.serve.worker._holder import Busy, Holder, NotParkable

log = logging.getLogger("zerostart.serve.worker")

SHUTDOWN_GRACE_S = 5  # on SIGTERM: how long open requests (and an image being written) may take to finish
_ENGINE = frozenset(r.path for r in PROXIED if r.engine)  # the routes that run the engine
_READY_STATUS = {WorkerState.STANDBY: 200, WorkerState.READY: 200, WorkerState.PARKED: 200, WorkerState.FAILED: 500}


def build_app(holder: Holder, name: str, token: str | None = None) -> Starlette:
    """The worker's ASGI app over ``holder``; ``name``: what it answers to before it holds a
    model; ``token``: the bearer token every request must carry (None: none needed, for a
    worker started by hand)."""
    r = _Routes(holder, name)
    app = App(lifespan=r.lifespan, routes=[
        Route("/zerostart/ready", r.ready),
        Route("/zerostart/phases", r.phases),
        Route("/zerostart/load", r.load, methods=["POST"]),
        Route("/zerostart/park", r.park, methods=["POST"]),
        Route("/zerostart/wake", r.wake, methods=["POST"]),
        Route("/health", r.health),
        Route("/v1/models", r.served("models")),
        *(Route(route.path, r.served(route.handler), methods=list(route.methods)) for route in PROXIED),
        Route("/tokenizer_info", r.served("tokenizer_info")),
    ])
    app.add_middleware(_Tracker, holder=holder)
    app.add_middleware(Guard, bounds=Bounds())  # a generation whose client left is cancelled
    if token:  # every route answers only requests carrying this worker's token (its gateway's)
        app.add_middleware(Auth, gate=Gate({token: Tenant("gateway", admin=True)}, refusal=Unauthorized(
            "this worker answers only the gateway that started it", code="invalid_worker_token")))
    return app


def _error(status: int, message: str, code: str, in_flight: list[InFlight] | None = None) -> JSONResponse:
    detail = ErrorDetail(message=message, type="server_error" if status >= 500 else "invalid_request_error", code=code)
    return JSONResponse(ErrorBody(error=detail, in_flight=in_flight).to_json(), status_code=status)


class _Routes:
    def __init__(self, holder: Holder, name: str) -> None:
        self.holder, self.name = holder, name

    def served_name(self) -> str:
        spec = self.holder.spec
        return spec.name if spec is not None and spec.name else self.name

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        if self.holder.engine is not None:
            self.holder.engine.stop()
        await asyncio.to_thread(self.holder.close, SHUTDOWN_GRACE_S)

    # -- reports ----------------------------------------------------------------------------

    async def ready(self, request: Request) -> Response:
        try:
            wait = float(request.query_params.get("wait", "0"))
        except ValueError:
            wait = 0.0
        await self.holder.wait_settled(wait)
        report = self.holder.ready_report(os.getpid())
        return JSONResponse(report.to_json(), status_code=_READY_STATUS.get(report.state, 503))

    async def phases(self, request: Request) -> Response:
        return JSONResponse(self.holder.phases_report().to_json())

    async def health(self, request: Request) -> Response:
        """Its state, the OpenAI requests it serves and the engine's sequences: a request the
        gateway still counts but the worker does not (or sequences with no request) is a leak."""
        h = self.holder
        body: dict[str, object] = {"status": h.state.value, "in_flight": len(h.in_flight)}
        if h.engine is not None:
            stats = h.engine.stats()
            body.update(running=stats["running"], waiting=stats["waiting"])
        return JSONResponse(body, status_code=500 if h.state is WorkerState.FAILED else 200)

    # -- control ----------------------------------------------------------------------------

    async def load(self, request: Request) -> Response:
        try:
            spec = LoadSpec.model_validate_json(await request.body() or b"{}")
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "body"
            return _error(400, f"{where}: {err['msg']}", "bad_request")
        holder = self.holder
        if holder.state is not WorkerState.STANDBY:
            return _error(409, f"this worker is {holder.state.value}; only a waiting standby worker (--standby) takes "
                          "/zerostart/load", "not_standby")
        if holder.standby_device and spec.device != holder.standby_device:
            log.warning("standby worker initialized %s; loading on %s pays its device init", holder.standby_device,
                        spec.device)
        holder.load(spec)
        return JSONResponse(LoadAccepted(model=spec.model, name=spec.name).to_json(), status_code=202)

    async def park(self, request: Request) -> Response:
        holder = self.holder
        if holder.state is WorkerState.PARKED:
            return JSONResponse(ParkResult(changed=False).to_json())
        try:
            holder.begin_park()
            return JSONResponse((await asyncio.to_thread(holder.park)).to_json())
        except Busy as e:
            busy = holder.in_flight_json()
            what = "; ".join(f"{r.method} {r.path} (id {r.id}, {r.age_s:.1f} s)" for r in busy)
            return _error(409, f"cannot park model {self.served_name()!r}: {e}" + (f": {what}" if what else ""), "busy",
                          in_flight=busy)
        except NotParkable as e:
            code = "not_parkable" if holder.state is WorkerState.READY else "not_ready"
            return _error(409, f"cannot park model {self.served_name()!r}: {e}", code)
        except Exception as e:  # noqa: BLE001 - the worker is now failed; the gateway stops it
            return _error(500, f"parking model {self.served_name()!r} failed: {type(e).__name__}: {e}", "park_failed")

    async def wake(self, request: Request) -> Response:
        holder = self.holder
        if holder.state is WorkerState.WAKING:  # another wake is under way: answer when it is done
            await holder.wait_settled(600.0)
        if holder.state is WorkerState.READY:
            return JSONResponse(WakeResult(changed=False).to_json())
        try:
            requested = holder.begin_wake()
        except NotParkable as e:
            return _error(409, f"cannot wake model {self.served_name()!r}: {e}", "not_ready")
        try:
            return JSONResponse((await asyncio.to_thread(holder.wake, requested)).to_json())
        except Exception as e:  # noqa: BLE001 - the worker is now failed; the gateway stops it
            return _error(500, f"waking model {self.served_name()!r} failed: {type(e).__name__}: {e}", "wake_failed")

    # -- the OpenAI routes ------------------------------------------------------------------

    def served(self, route: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            holder = self.holder
            if holder.state is not WorkerState.READY or holder.routes is None:
                return self._not_ready()
            handle: Callable[[Request], Awaitable[Response]] = getattr(holder.routes, route)
            return await handle(request)

        return handler

    def _not_ready(self) -> Response:
        holder, name = self.holder, self.served_name()
        msg = (f"model {name!r} failed to load: {holder.error}" if holder.state is WorkerState.FAILED
               else f"model {name!r} is not ready (state: {holder.state.value}, phase: {holder.phase})")
        return _error(503, msg, "not_ready")


class _Tracker:
    """Counts the OpenAI requests in flight (until their last byte is sent), so that a park can
    refuse while any is. While the model is parked they are refused; while it wakes they wait."""

    def __init__(self, app: ASGIApp, holder: Holder) -> None:
        self.app, self.holder = app, holder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        h = self.holder
        if scope["type"] != "http" or scope["path"] not in _ENGINE:
            await self.app(scope, receive, send)
            return
        while h.state is WorkerState.WAKING or h.paused:
            await (h.wait_settled(60.0) if h.state is WorkerState.WAKING else h.wait_unpaused(60.0))
        if h.state in (WorkerState.PARKING, WorkerState.PARKED):
            name = h.spec.name if h.spec is not None else "?"
            msg = (f"model {name!r} is {h.state.value} (its weights are in host memory); "
                   "POST /zerostart/wake first")
            await _error(503, msg, "model_parked")(scope, receive, send)
            return
        rid = h.begin_request(scope["method"], scope["path"])  # no await since the state check: a park sees it
        try:
            await self.app(scope, receive, send)
        finally:
            h.end_request(rid)
