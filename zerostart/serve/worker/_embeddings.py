"""``/v1/embeddings`` bodies: inputs to token lists, vectors to OpenAI's response shape.

    input            a string, a list of strings, a list of token ids, or a list of those
    encoding_format  "float" (lists of numbers) or "base64" (little-endian float32 bytes, as
                     OpenAI encodes them and its SDK decodes them)
    dimensions       the first that many values, renormalized (PoolingParams.dimensions)

Each input is one engine request (:class:`zerostart.engine.PoolingParams`), batched with
whatever else the engine runs; the model's config says how it pools (``embedding:``).
"""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import TYPE_CHECKING, Any

from zerostart.engine import PoolingParams
from zerostart.serve._config import EmbeddingConfig
from zerostart.serve.edge import BadRequest, EmbeddingRequest, ServeError
from zerostart.serve.control import RequestStats
from zerostart.serve.worker._stats import Timing, request_stats

if TYPE_CHECKING:
    from zerostart.engine import Engine


class Run:
    """One embeddings request, submitted: ``await result()`` for its body and stats."""

    def __init__(self, engine: Engine, req: EmbeddingRequest, config: EmbeddingConfig, prompts: list[list[int]]) -> None:
        self.req = req
        hidden = engine.model_config.hidden_size
        if req.dimensions is not None and req.dimensions > hidden:
            raise BadRequest(f"dimensions: {req.dimensions} is more than this model's {hidden}", param="dimensions")
        limit = engine.max_model_len
        for i, ids in enumerate(prompts):
            if not ids:
                raise BadRequest(f"input[{i}] is empty after tokenization", param="input")
            if len(ids) > limit:
                raise BadRequest(f"input[{i}] has {len(ids)} tokens; this model's maximum context length is {limit}",
                                 param="input")
        params = PoolingParams(pooling=config.pooling, normalize=config.normalize, dimensions=req.dimensions)
        self.handles: list[Any] = []
        try:
            for ids in prompts:
                self.handles.append(engine.submit(ids, params))
        except ValueError as e:  # the engine refuses what it cannot run (a token id past its vocabulary)
            self.cancel()
            raise BadRequest(str(e), param="input") from None
        self.timings = [Timing(h) for h in self.handles]

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def result(self, model: str) -> tuple[dict[str, Any], RequestStats]:
        try:
            events = await asyncio.gather(*(_last(h, t) for h, t in zip(self.handles, self.timings)))
        except BaseException:
            self.cancel()
            raise
        tokens = sum(ev.prompt_tokens for ev in events)
        vectors = [ev.embedding for ev in events]
        if any(v is None for v in vectors):  # aborted (the engine is stopping)
            raise ServeError("the engine stopped before these embeddings were made; retry the request")
        usage = {"prompt_tokens": tokens, "completion_tokens": 0}
        made = await asyncio.to_thread(body, model, vectors, self.req.encoding_format, tokens)  # many vectors: a while
        return made, request_stats(usage, self.timings)


async def _last(handle: Any, timing: Timing) -> Any:
    last = None
    async for ev in handle.aiter():
        timing.take(ev)
        last = ev
    return last


def encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    raise BadRequest(f"encoding_format {fmt!r} is not supported (float, base64)", param="encoding_format")


def body(model: str, vectors: list[list[float]], fmt: str, prompt_tokens: int) -> dict[str, Any]:
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v, fmt)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
