"""The HTTP edge that the gateway, its workers and the cluster's ingress share (torch-free):

    _routes.py       the route table: paths, bodies, which models take them, who may call them
    _schema.py, _responses.py, _parse.py   the request bodies (strict types) and their one parser
    _auth.py         bearer keys, tenants, the admin role (Gate, Auth)
    _guard.py        bounds on one request and an end for every request (Guard); what a request
                     holds is given back when it is over, by construction (resources)
    _app.py          every answer in OpenAI's error shape (App), headers on every response
    _stream.py       holding a streamed request with SSE keep-alives (Hold), ClosingStream
    _cards.py        model cards
    _connections.py  client connections bounded, HTTP/1.1 framing checked (bounded_protocol)
    _errors.py       the errors, each with its status and OpenAI's shape
"""

from zerostart.serve.edge._app import App, DefaultHeaders, error_response, not_found
from zerostart.serve.edge._auth import ANYONE, TENANT, Auth, Gate, Tenant, key_tenant, tenant_of
from zerostart.serve.edge._cards import model_card, model_list
from zerostart.serve.edge._connections import bounded_protocol
from zerostart.serve.edge._errors import (BadRequest, BodyTimeout, BodyTooLarge, Forbidden, InternalError, NotFound,
                                          NotServed, QueueFull, RequestTimeout, ServeError, ShuttingDown, StartFailed,
                                          StartTimeout, Unauthorized, UnknownModel, UnknownResponse, WorkerFailed,
                                          WorkerReplaced)
from zerostart.serve.edge._guard import (ABORT, STATUS, Bounds, Guard, pause_deadline, replay, resources,
                                         restart_deadline)
from zerostart.serve.edge._parse import OpenAIBody, parse_body, parse_request
from zerostart.serve.edge._responses import (FunctionCallItem, FunctionCallOutputItem, InputItem, MessageItem, NamedTool,
                                             ResponsesRequest)
from zerostart.serve.edge._routes import (COLD_START_HEADER, PROXIED, ROUTE_TABLE, ROUTES, Access, ApiRoute,
                                          openai_paths, paths)
from zerostart.serve.edge._schema import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                          GenerateRequest, RequestBody, ResponseFormat, TokenizeRequest)
from zerostart.serve.edge._stream import SSE_HEADERS, ClosingStream, Hold

__all__ = [
    "ABORT", "ANYONE", "Access", "ApiRoute", "App", "Auth", "BadRequest", "BodyTimeout", "BodyTooLarge", "Bounds",
    "COLD_START_HEADER", "ChatCompletionRequest", "ClosingStream", "CompletionRequest", "DefaultHeaders",
    "DetokenizeRequest", "EmbeddingRequest", "Forbidden", "FunctionCallItem", "FunctionCallOutputItem", "Gate",
    "GenerateRequest", "Guard", "Hold", "InputItem", "InternalError", "MessageItem", "NamedTool", "NotFound",
    "NotServed", "OpenAIBody", "PROXIED", "QueueFull", "ROUTES", "ROUTE_TABLE", "RequestBody", "RequestTimeout",
    "ResponseFormat", "ResponsesRequest", "SSE_HEADERS", "STATUS", "ServeError", "ShuttingDown", "StartFailed",
    "StartTimeout", "TENANT", "Tenant", "TokenizeRequest", "Unauthorized", "UnknownModel", "UnknownResponse",
    "WorkerFailed", "WorkerReplaced", "bounded_protocol", "error_response", "key_tenant", "model_card", "model_list",
    "not_found", "openai_paths", "parse_body", "parse_request", "paths", "pause_deadline", "replay", "resources",
    "restart_deadline", "tenant_of"
]
