"""``/v1/embeddings`` bodies: inputs to token lists, vectors to OpenAI's response shape.

    input            a string, a list of strings, a list of token ids, or a list of those
    encoding_format  "float" (lists of numbers) or "base64" (little-endian float32 bytes, as
                     OpenAI encodes them and its SDK decodes them)
    dimensions       the first that many values, renormalized (PoolingParams.dimensions)
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from zerostart.serve._errors import BadRequest


def inputs(value: Any) -> list[str | list[int]]:
    """One entry per input: text or token ids (BadRequest naming ``input`` otherwise)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [list(value)]
        if all(isinstance(x, str) for x in value):
            return list(value)
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
               for x in value):
            return [list(x) for x in value]
    raise BadRequest("input must be a string, a list of strings, a list of token ids or a list of token-id lists "
                     "(none empty)", param="input")


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
