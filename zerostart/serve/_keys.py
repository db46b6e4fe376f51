"""Validation errors that name the key that is wrong, for the config file and request bodies
alike::

    models[0].idle_timout: unknown key (did you mean 'idle_timeout'?)
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError


def describe_errors(error: ValidationError, schema: type[BaseModel]) -> str:
    """One line per problem, each naming its key: ``models[0].port: ...``."""
    lines = []
    for err in error.errors():
        loc = format_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            known = _known_keys(schema, err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else (f" (known keys: {', '.join(known)})" if known else "")
            lines.append(f"{loc}: unknown key{extra}")
        elif err["type"] == "missing":
            lines.append(f"{loc}: missing, and has no default")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _known_keys(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at ``loc`` accepts (walking lists and dicts of sections)."""
    current: Any = schema
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None:
            return []
        if part not in fields:
            # a dict of sections (devices: {cpu: {...}}): the key is a free name
            continue
        current = _section_type(fields[part].annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None
