"""What every section of the serve config is made of: a section that refuses unknown keys, and
the value types the YAML writes in units (``30s``, ``2GiB``, ``auto``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

from zerostart.units import parse_duration, parse_size

Seconds = Annotated[float, BeforeValidator(lambda v: parse_duration(v))]
# A keep-alive: seconds, where negative means forever (Ollama's convention).
KeepAlive = Annotated[float, BeforeValidator(lambda v: parse_duration(v, forever_if_negative=True))]
Bytes = Annotated[int, BeforeValidator(parse_size)]


def _size_or_auto(v: object) -> int | str:
    if v == "auto":
        return "auto"
    try:
        return parse_size(v)
    except ValueError as e:
        raise ValueError(f"{e}, or 'auto'") from None


BytesOrAuto = Annotated[int | Literal["auto"], BeforeValidator(_size_or_auto)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

