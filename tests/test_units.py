"""The leaf's units: durations and sizes as people write them (config files, request bodies,
policy specs, command lines)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from zerostart.serve import load_config
from zerostart.units import FOREVER, parse_duration, parse_size


@pytest.mark.parametrize("text, seconds", [
    (300, 300.0), (0.5, 0.5), ("300", 300.0), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
    ("250ms", 0.25), ("2d", 172800.0), ("0", 0.0), (" 10s ", 10.0),
])
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_keep_alive_durations() -> None:
    assert parse_duration(-1, forever_if_negative=True) == FOREVER
    assert parse_duration("-5m", forever_if_negative=True) == FOREVER
    assert math.isinf(load_config(data={"models": [{"path": "x", "idle_timeout": -1}]}).models[0].idle_timeout)
    for bad in ("5 minutes", "m5", "", "1h x", True, None, [1]):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-1)


@pytest.mark.parametrize("text, n", [
    (1024, 1024), ("1024", 1024), ("1KiB", 1024), ("1.5GiB", 3 * 2**29), ("512MB", 512_000_000), ("8 gib", 8 * 2**30),
    ("100b", 100),
])
def test_sizes(text: Any, n: int) -> None:
    assert parse_size(text) == n


def test_bad_sizes() -> None:
    for bad in ("lots", "-1", -5, "1 XB", True, float("inf")):
        with pytest.raises(ValueError):
            parse_size(bad)
