"""The gateway's memory of ``/v1/responses`` answers, for ``previous_response_id`` and
``GET``/``DELETE /v1/responses/{id}``, by tenant.

A stored response belongs to the tenant whose key made it: its id, its body and the chain of
conversation it continues are that tenant's alone, and to any other tenant the id is exactly as
unknown as one never made. The store is in memory (a restart forgets it) and bounded three ways
(``server.responses_store``): at most ``max_items`` responses and ``max_bytes`` of them (their
JSON: the Response and the conversation it ends), each for at most ``ttl`` seconds; past a bound
the oldest go first. A response larger than ``max_bytes`` on its own is not kept. The bounds are
the server's, shared by its tenants.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from zerostart.serve.edge import Tenant


@dataclass(frozen=True)
class Stored:
    response: bytes  # the Response, as JSON
    conversation: bytes  # the messages up to and including its output, as JSON
    at: float  # monotonic

    @property
    def size(self) -> int:
        return len(self.response) + len(self.conversation)

    def messages(self) -> list[dict[str, Any]]:
        out = json.loads(self.conversation)
        assert isinstance(out, list)
        return out


class ResponseStore:
    def __init__(self, max_items: int, ttl_s: float, max_bytes: int) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[str, str], Stored] = OrderedDict()  # (tenant, id), oldest first

    def put(self, tenant: Tenant, response: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
        """Keep ``response`` for ``tenant``; False when it is larger than the whole store."""
        self._expire()
        item = Stored(json.dumps(response).encode(), json.dumps(messages).encode(), time.monotonic())
        if item.size > self.max_bytes or self.max_items == 0:
            return False
        self._items[(tenant.name, response["id"])] = item
        self.bytes += item.size
        while len(self._items) > self.max_items or self.bytes > self.max_bytes:
            self._drop_oldest()
        return True

    def get(self, tenant: Tenant, response_id: str) -> Stored | None:
        self._expire()
        return self._items.get((tenant.name, response_id))

    def delete(self, tenant: Tenant, response_id: str) -> bool:
        item = self._items.pop((tenant.name, response_id), None)
        if item is None:
            return False
        self.bytes -= item.size
        return True

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def _expire(self) -> None:
        limit = time.monotonic() - self.ttl_s
        while self._items and next(iter(self._items.values())).at < limit:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, item = self._items.popitem(last=False)
        self.bytes -= item.size
