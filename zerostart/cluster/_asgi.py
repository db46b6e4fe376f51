"""Call an ASGI app in this process and get its response as it is written: the head first,
then the body chunk by chunk. An engine replica runs zerostart's gateway app this way, so a
request crosses no socket between Ray's replica and the gateway's fleet, and a stream is
relayed as the worker writes it.

    async for part in call("POST", "/v1/chat/completions", body, headers, app=app):
        part  # Head(status, headers) once, then bytes
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncGenerator

from starlette.types import ASGIApp, Message

from zerostart.serve.edge import replay

_DISCONNECT_GRACE_S = 5.0


@dataclass(frozen=True)
class Head:
    """The status and headers of a response, sent before its body."""

    status: int
    headers: list[tuple[str, str]]


async def call(method: str, path: str, body: bytes, headers: list[tuple[str, str]], *,
               app: ASGIApp) -> AsyncGenerator[Head | bytes, None]:
    """The response of ``app`` to one request, as it is written. Closing the iterator early (the
    client went away) tells the app the client disconnected, and waits for it to finish."""
    sent: asyncio.Queue[Message | BaseException | None] = asyncio.Queue()
    gone = asyncio.Event()

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(_scope(method, path, headers), replay(body, gone), send)
        except BaseException as e:  # surfaced to the reader below, where it can be answered
            await sent.put(e)
            raise
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await sent.get()
            if message is None:
                return
            if isinstance(message, BaseException):
                raise message
            if message["type"] == "http.response.start":
                yield Head(message["status"], [(k.decode("latin-1"), v.decode("latin-1"))
                                               for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            # a stream's app notices the disconnect and closes the worker's stream; give it that long
            await asyncio.wait({task}, timeout=_DISCONNECT_GRACE_S)
            task.cancel()


def _scope(method: str, path: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
    raw_path, _, query = path.partition("?")
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": raw_path, "raw_path": raw_path.encode(),
            "query_string": query.encode(), "root_path": "", "server": ("ray-replica", 0), "client": None,
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}
