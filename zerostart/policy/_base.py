"""The policy interface shared by the server's fleet and the simulator.

A policy observes arrivals and completions per model and, when asked, says which rung a model
should rest on now and when it should next be looked at or pre-warmed. Time is a float of
seconds on whatever clock the caller uses (the fleet: ``time.monotonic()``-like; the
simulator: trace time); policies never read a clock themselves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Rung(str, enum.Enum):
    """Where a model rests; lower rungs cost less to hold and more to climb."""

    HOT = "hot"  # weights in device memory, ready to serve
    PARKED = "parked"  # process and compiled state alive, weights in host RAM
    IMAGE = "image"  # nothing alive; a ready image on local disk
    ZERO = "zero"  # nothing alive; only the source checkpoint


@dataclass(frozen=True)
class ModelView:
    """What the caller tells a policy about one model at decision time."""

    name: str
    rung: Rung  # where it rests now
    busy: bool  # a request in flight or a load in progress: never move down
    last_active: float  # time of the last arrival or completion (or the start of time)
    size_bytes: int = 0


@dataclass(frozen=True)
class Decision:
    rung: Rung  # where the model should rest now (never lower than HOT while busy)
    prewarm_at: float | None = None  # when to climb to HOT ahead of predicted traffic
    recheck_at: float | None = None  # when the decision may change without new observations
    reason: str = ""


class Policy(Protocol):
    name: str

    def observe_arrival(self, model: str, t: float) -> None: ...

    def observe_completion(self, model: str, t: float) -> None: ...

    def decide(self, view: ModelView, now: float) -> Decision: ...
