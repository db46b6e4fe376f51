"""The policy interface shared by the server's fleet and the simulator.

A policy observes arrivals and completions per model and, when asked, says which rung a model
should rest on now and when it should next be looked at or pre-warmed. Time is a float of
seconds on whatever clock the caller uses (the fleet: ``time.monotonic()``-like; the
simulator: trace time); policies never read a clock themselves.

How a caller drives a policy (the fleet and ``zerostart.sim`` both do exactly this):

1. ``observe_arrival(model, t)`` for every request, ``observe_completion(model, t)`` for every
   finished one (in time order per model).
2. ``decide(view, now)`` whenever a model goes idle (the completion that leaves nothing in
   flight), when a climb it asked for has finished, at ``Decision.recheck_at``, and whenever
   else the caller likes: it is cheap and returns the same answer for the same history.
3. Apply the answer: ``rung`` lower than the model's rung -> move down now; ``rung`` HOT while
   the model rests lower -> climb now (a pre-warm). Never move a busy model down.
4. At ``prewarm_at`` start climbing to HOT (the policy has already subtracted the climb time
   it expects), then call ``decide`` again once the climb is done.

A request that reaches a model below HOT climbs it regardless of policy: that is a cold start.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class PolicyError(ValueError):
    """A policy spec, cost model or telemetry file is wrong; the message names what and where."""


class Rung(str, enum.Enum):
    """Where a model rests; lower rungs cost less to hold and more to climb.

    Transitions (DESIGN.md §2):
      HOT    -> PARKED  release device memory, keep the worker and its graphs
      PARKED -> IMAGE   stop the worker; the ready image stays on local disk
      IMAGE  -> ZERO    nothing to do but forget (the source checkpoint stays where it is)
      any    -> HOT     a climb: wake, restore the image, or load from source
    """

    HOT = "hot"  # weights in device memory, ready to serve
    PARKED = "parked"  # process and compiled state alive, weights in host RAM
    IMAGE = "image"  # nothing alive; a ready image on local disk
    ZERO = "zero"  # nothing alive; only the source checkpoint

    @property
    def level(self) -> int:
        """0 for HOT up to 3 for ZERO: a larger level is a lower, colder rung."""
        return _LEVEL[self]

    @classmethod
    def parse(cls, name: str) -> "Rung":
        """A rung from its name; ``source`` is accepted for ZERO (the coldstart telemetry's word)."""
        key = name.strip().lower()
        if key == "source":
            return cls.ZERO
        try:
            return cls(key)
        except ValueError:
            valid = ", ".join(r.value for r in LADDER)
            raise PolicyError(f"unknown rung {name!r}; valid: {valid} (or 'source' for zero)") from None


LADDER: tuple[Rung, ...] = (Rung.HOT, Rung.PARKED, Rung.IMAGE, Rung.ZERO)  # top to bottom
_LEVEL = {r: i for i, r in enumerate(LADDER)}


@dataclass(frozen=True)
class ModelView:
    """What the caller tells a policy about one model at decision time."""

    name: str
    rung: Rung  # where it rests now (a model being climbed counts as HOT)
    busy: bool  # a request in flight or a load in progress: never move down
    last_active: float  # time of the last arrival or completion (or the start of time)
    size_bytes: int = 0  # 0: unknown, the cost model's default size applies
    # the rungs this model can rest on (its engine's: vLLM on CPU cannot park, foreign engines
    # keep no ready image); policies choose among these only. HOT and ZERO are always there.
    rungs: tuple[Rung, ...] = (Rung.HOT, Rung.PARKED, Rung.IMAGE, Rung.ZERO)


@dataclass(frozen=True)
class Decision:
    rung: Rung  # where the model should rest now (never lower than HOT while busy)
    prewarm_at: float | None = None  # when to start climbing to HOT ahead of predicted traffic
    recheck_at: float | None = None  # when the decision may change without new observations
    reason: str = ""


def usable(rung: Rung, view: ModelView) -> Rung:
    """``rung`` if the model can rest there, else the next lower rung it can rest on (ZERO at
    the bottom is always possible: nothing alive)."""
    for r in LADDER[rung.level:]:
        if r in view.rungs or r is Rung.ZERO:
            return r
    return Rung.ZERO


class Policy(Protocol):
    """One object serves a whole fleet; it keeps per-model history keyed by model name."""

    name: str  # the spec it was made from, e.g. ``ttl:300``
    rungs: tuple[Rung, ...]  # the rungs it may rest a model on, top first

    def observe_arrival(self, model: str, t: float) -> None: ...

    def observe_completion(self, model: str, t: float) -> None: ...

    def decide(self, view: ModelView, now: float) -> Decision: ...
