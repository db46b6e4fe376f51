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

from dataclasses import dataclass
from typing import Protocol

from zerostart.names import LADDER, Rung


class PolicyError(ValueError):
    """A policy spec, cost model or telemetry file is wrong; the message names what and where."""


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
    rungs: tuple[Rung, ...] = LADDER
    # where a fixed keep-alive counts from, when not last_active: the server's requests may ask
    # for a keep_alive of their own (Ollama's), which holds the model instead of the policy's
    # timeout, so only the latest activity that asked for none counts here (-inf: none did)
    timeout_from: float | None = None


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
