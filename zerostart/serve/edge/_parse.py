"""A request body becomes a typed request here, once, or a :class:`BadRequest` naming the field.

Every body is an :class:`OpenAIBody`: types are strict, as OpenAI's are (``"3"`` is not a
number, ``2.0`` is not an integer, ``1`` is not a boolean). Before the schema sees it, the JSON
is decoded and its text checked: a lone UTF-16 surrogate (``"\\ud800"``, valid JSON, not valid
Unicode) is a 400 naming the field it is in, never a 500 from whatever encodes it later (the
tokenizer, a JSON answer, a log line).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from zerostart.serve._keys import format_loc
from zerostart.serve.edge._errors import BadRequest

_THREAD_PARSE_BYTES = 256 * 1024  # bodies larger than this are parsed off the event loop
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff: only such bodies are searched
_SURROGATE = re.compile("[\ud800-\udfff]")  # what is left of an escape that was not half of a pair

B = TypeVar("B", bound=BaseModel)


class FieldError(ValueError):
    """A check of the whole body that is about one field (``field`` may be a path such as
    ``messages[2].content``): a model validator's error has no location of its own, and the
    400 names the field (``param``) from this."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class OpenAIBody(BaseModel):
    """The base of every request body and its parts: strict types, unknown fields kept (and
    ignored unless a subclass refuses them)."""

    model_config = ConfigDict(extra="allow", strict=True)


def parse_request(schema: type[B], raw: bytes) -> B:
    """Validate a request body; a :class:`BadRequest` naming the bad field otherwise."""
    try:
        data = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise BadRequest("The request body is not valid JSON here: it is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers of more than 4300 digits, NaN
        raise BadRequest(f"The request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw) and (where := lone_surrogate(data)) is not None:
        raise BadRequest(f"{format_loc(where)}: contains a lone UTF-16 surrogate (an escape such as \\ud800 that is "
                         "not half of a pair), which is not Unicode text; send the text as UTF-8 or as a pair",
                         param=str(where[0]) if where else None)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = format_loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "this field is required"
        cause = (err.get("ctx") or {}).get("error")
        if err["loc"]:
            param: str | None = str(err["loc"][0])
        elif isinstance(cause, FieldError):  # the top-level field a whole-body check is about
            param = re.split(r"[.\[]", cause.field, maxsplit=1)[0]
        else:
            param = None
        text = f"{loc}: {msg}" if loc else msg
        more = len(e.errors()) - 1
        bad = BadRequest(text + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""), param=param)
        bad.model = data.get("model") if isinstance(data.get("model"), str) else None
        raise bad from None
    except RecursionError:
        raise BadRequest("The request body is nested too deeply") from None


async def parse_body(schema: type[B], raw: bytes) -> B:
    """:func:`parse_request`, on a thread for a large body so the event loop keeps serving."""
    if len(raw) <= _THREAD_PARSE_BYTES:
        return parse_request(schema, raw)
    return await asyncio.to_thread(parse_request, schema, raw)


def lone_surrogate(data: Any) -> tuple[Any, ...] | None:
    """Where in decoded JSON the first string (a value or a key) holding a lone surrogate is,
    as a location (``("messages", 0, "content")``); None when there is none. Iterative: a
    document json accepted is never too deep for it."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):
                if _SURROGATE.search(k):  # named escaped: the answer itself must be valid text
                    return (*where, k.encode("utf-8", "backslashreplace").decode("utf-8"))
                stack.append(((*where, k), v))
        elif isinstance(value, list):
            stack.extend(((*where, i), v) for i, v in reversed(list(enumerate(value))))
    return None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")
