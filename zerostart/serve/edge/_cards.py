"""Model cards: what ``GET /v1/models`` and ``/v1/models/{id}`` say about a model, in OpenAI's
shape with vLLM's fields, the same from the gateway, a worker and the cluster's ingress::

    {"id", "object": "model", "created", "owned_by": "zerostart",
     "root": the model's source, "parent": null, "max_model_len": the context it serves (null: not known yet)}
"""

from __future__ import annotations

from typing import Any, Iterable


def model_card(name: str, created: int, *, root: str | None, max_model_len: int | None,
               **extra: Any) -> dict[str, Any]:
    """One model's card; ``extra``: fields of the server that answers (the cluster's ``pool``)."""
    # root and parent as vLLM's (the source; no base model)
    return {"id": name, "object": "model", "created": created, "owned_by": "zerostart", "root": root,
            "parent": None, "max_model_len": max_model_len, **extra}


def model_list(cards: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": list(cards)}
