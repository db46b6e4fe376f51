"""Errors the edge answers with (gateway, worker and cluster alike), in OpenAI's JSON shape::

    {"error": {"message": "...", "type": "...", "param": null, "code": "..."}}

Each carries its HTTP status; messages say what failed and what to do about it.
"""

from __future__ import annotations

import json
import math
from typing import Any


class ServeError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after)))}

    def sse_event(self) -> bytes:
        """The error as one SSE data event, for a stream whose headers already went out (the
        openai client raises ``APIError`` with this message)."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"

    def sse_ending(self) -> bytes:
        """The last words of a stream that ends in this error: its event, then ``[DONE]``."""
        return self.sse_event() + b"data: [DONE]\n\n"


class BadRequest(ServeError):
    status = 400
    type = "invalid_request_error"
    model: str | None = None  # the model the request named, when it named one


class BodyTimeout(ServeError):
    """The request body did not arrive within ``server.body_timeout``."""

    status = 408
    type = "invalid_request_error"
    code = "body_timeout"


class BodyTooLarge(ServeError):
    status = 413
    type = "invalid_request_error"
    code = "body_too_large"


class Unauthorized(ServeError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    challenge = "Bearer"  # what the client is asked for (a browser's page: HTTP Basic, which it prompts for)

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "www-authenticate": self.challenge}


class Forbidden(ServeError):
    """A known key asking for a route its tenant may not use (the operational routes need an admin)."""

    status = 403
    type = "invalid_request_error"
    code = "admin_only"


class NotFound(ServeError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class UnknownModel(NotFound):
    code = "model_not_found"


class UnknownResponse(NotFound):
    """A stored response this tenant does not have: never made, forgotten, or another tenant's
    (the same answer for each, so that an id tells nobody else anything)."""

    code = "response_not_found"


class NotServed(ServeError):
    """A route the backend serving a model does not have (e.g. /tokenize on some engines)."""

    status = 501
    type = "invalid_request_error"
    code = "route_not_supported"


class QueueFull(ServeError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class WorkerFailed(ServeError):
    """The worker serving a request died or could not be reached mid-request."""

    status = 502
    code = "worker_exited"


class WorkerReplaced(ServeError):
    """The worker was not in the state its gateway put it in (moved by someone else, or failed):
    it is being replaced; the request can be retried."""

    status = 503
    code = "worker_replaced"


class StartFailed(ServeError):
    """The model could not be started (bad checkpoint, worker crash at load, no memory)."""

    status = 503
    code = "model_start_failed"

    def __init__(self, message: str, *, cause: str = "load_error", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.cause = cause  # metric label: load_error, exit, spawn, memory, internal (timeouts: timeout)


class StartTimeout(ServeError):
    status = 504
    code = "model_start_timeout"


class ShuttingDown(ServeError):
    status = 503
    code = "shutting_down"


class RequestTimeout(ServeError):
    """The request ran past ``server.request_timeout``; the worker stops generating."""

    status = 504
    code = "request_timeout"


class InternalError(ServeError):
    """A bug: something failed that nothing expected (the traceback is in the log)."""

    status = 500
    code = "internal_error"
