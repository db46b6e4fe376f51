"""Durations and sizes as people write them in config files, request bodies, policy specs and
command lines (part of the torch-free leaf, with ``names.py``: it imports nothing of zerostart).

Durations: a number of seconds (``300``, ``0.5``) or a string of units (``"500ms"``, ``"30s"``,
``"5m"``, ``"1h30m"``). Keep-alive durations follow Ollama: negative means forever, ``0`` means
as soon as the request is done. Sizes: a number of bytes or ``"512MiB"``, ``"8GiB"``, ``"1.5GB"``.
"""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _SIZE_UNITS[f"{_p}b"] = 1000**_i
    _SIZE_UNITS[f"{_p}ib"] = 1024**_i

FOREVER = math.inf
GB = 1e9  # prices, bandwidths and model sizes in the cost model are decimal
HOURS_PER_MONTH = 730.0  # 8760 / 12, the convention cloud price lists use

__all__ = ["FOREVER", "GB", "HOURS_PER_MONTH", "format_duration", "format_size", "parse_duration", "parse_size"]


def parse_duration(value: object, *, forever_if_negative: bool = False) -> float:
    """Seconds from ``300``, ``"5m"``, ``"1h30m"``, ``"250ms"``; with ``forever_if_negative``,
    any negative value (``-1``, ``"-1m"``) means :data:`FOREVER`."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a duration (seconds, or a string like '30s', '5m', '1h'), got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        negative = text.startswith("-")
        body = text.lstrip("+-").strip()
        try:
            seconds = float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"expected a duration (seconds, or a string like '30s', '5m', '1h30m'), got {value!r}") from None
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
        seconds = -seconds if negative else seconds
    else:
        raise ValueError(f"expected a duration (seconds, or a string like '30s', '5m', '1h'), got {value!r}")
    if math.isnan(seconds):
        raise ValueError("a duration cannot be NaN")
    if seconds < 0:
        if forever_if_negative:
            return FOREVER
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``1073741824``, ``"1GiB"``, ``"512 MB"`` (``KB``/``MB``/... are powers of 1000,
    ``KiB``/``MiB``/... powers of 1024)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected a size (bytes, or a string like '512MiB', '8GiB'), got {value!r}")
    if isinstance(value, int):
        n = float(value)
    elif isinstance(value, float):
        n = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"expected a size (bytes, or a string like '512MiB', '8GiB'), got {value!r}")
        n = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    else:
        raise ValueError(f"expected a size (bytes, or a string like '512MiB', '8GiB'), got {value!r}")
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"a size must be a non-negative number of bytes, got {value!r}")
    return int(n)


def format_size(n: int | float) -> str:
    """``1536 MiB``-style text for messages."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "forever"
    return f"{seconds:g} s"
