"""The routes of the HTTP edge, in one table: the path, its methods, its body, which models
take it, who may call it and who answers it. The gateway builds its routes from it, the worker
its OpenAI routes, the cluster's ingress forwards by it, ``Guard`` bounds the bodies it lists,
and an unknown path's 404 names what it has. A new route is a row here, its body's schema
(``_schema.py``) and its handler.

    path                      methods      body                    models     access  answered by
    /v1/chat/completions      POST         ChatCompletionRequest   generate   tenant  a replica (proxied)
    /v1/completions           POST         CompletionRequest       generate   tenant  a replica (proxied)
    /v1/embeddings            POST         EmbeddingRequest        embed      tenant  a replica (proxied)
    /tokenize, /detokenize    POST         (De)TokenizeRequest     any        tenant  a replica (proxied)
    /v1/responses             POST         ResponsesRequest        generate   tenant  the gateway (a chat)
    /v1/responses/{id}        GET, DELETE                                     tenant  the gateway (its store)
    /v1/models[/{id}]         GET                                             tenant  the gateway
    /health, /ping            GET (POST)                                      open    the gateway
    /version                  GET                                             tenant  the gateway
    /metrics                  GET                                             admin   the gateway (open with
                                                                                      metrics_auth: false)
    /zerostart/status         GET                                             admin   the gateway

Access: ``open`` needs no key; ``tenant`` any known key (what it shows is its tenant's own);
``admin`` a key of an admin tenant (the whole server's state). ``_auth.py`` applies it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from zerostart.serve.edge._responses import ResponsesRequest
from zerostart.serve.edge._schema import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                          RequestBody, TokenizeRequest)

COLD_START_HEADER = "x-zerostart-cold-start-ms"  # on every answer: what the request waited for a cold start


class Access(enum.Enum):
    OPEN = "open"  # anyone, without a key: liveness probes
    TENANT = "tenant"  # any known key; what the route shows is the tenant's own
    ADMIN = "admin"  # a key of an admin tenant: the whole server's state


@dataclass(frozen=True)
class ApiRoute:
    path: str  # starlette's syntax for parameters: /v1/models/{model:path}
    methods: tuple[str, ...]
    handler: str  # the answering side's method: a worker's for proxied routes, the gateway's otherwise
    access: Access = Access.TENANT
    body: type[RequestBody] | None = None  # the schema of the POST body
    serves: Literal["generate", "embed", "any"] | None = None  # the models that take it
    proxied: bool = False  # answered by the model's replica, byte for byte
    engine: bool = False  # runs the replica's engine (a worker counts it in flight, refuses it while parked)


def _proxied(path: str, handler: str, body: type[RequestBody], serves: Literal["generate", "embed", "any"],
             engine: bool) -> ApiRoute:
    return ApiRoute(path, ("POST",), handler, body=body, serves=serves, proxied=True, engine=engine)


ROUTE_TABLE: tuple[ApiRoute, ...] = (
    _proxied("/v1/chat/completions", "chat", ChatCompletionRequest, "generate", engine=True),
    _proxied("/v1/completions", "completions", CompletionRequest, "generate", engine=True),
    _proxied("/v1/embeddings", "embeddings", EmbeddingRequest, "embed", engine=True),
    _proxied("/tokenize", "tokenize", TokenizeRequest, "any", engine=False),
    _proxied("/detokenize", "detokenize", DetokenizeRequest, "any", engine=False),
    ApiRoute("/v1/responses", ("POST",), "create_response", body=ResponsesRequest, serves="generate"),
    ApiRoute("/v1/responses/{response_id}", ("GET",), "get_response"),
    ApiRoute("/v1/responses/{response_id}", ("DELETE",), "delete_response"),
    ApiRoute("/v1/models", ("GET",), "list_models"),
    ApiRoute("/v1/models/{model:path}", ("GET",), "get_model"),
    ApiRoute("/health", ("GET",), "health", Access.OPEN),
    ApiRoute("/ping", ("GET", "POST"), "ping", Access.OPEN),
    ApiRoute("/version", ("GET",), "version"),
    ApiRoute("/metrics", ("GET",), "metrics", Access.ADMIN),
    ApiRoute("/zerostart/status", ("GET",), "status", Access.ADMIN),
)

PROXIED: tuple[ApiRoute, ...] = tuple(r for r in ROUTE_TABLE if r.proxied)
ROUTES: dict[str, type[RequestBody]] = {r.path: r.body for r in PROXIED if r.body is not None}  # proxied path -> body
BODY_PATHS = frozenset(r.path for r in ROUTE_TABLE if r.body is not None)  # what Guard bounds (with every /v1/ POST)


def paths(access: Access) -> frozenset[str]:
    """The routes (without parameters) that need ``access``."""
    return frozenset(r.path for r in ROUTE_TABLE if r.access is access and "{" not in r.path)


def openai_paths() -> list[str]:
    """The OpenAI routes a client may look for under /v1 (for the 404 of one that is not here)."""
    return list(dict.fromkeys(r.path.split("/{", 1)[0] for r in ROUTE_TABLE if r.path.startswith("/v1/")))
