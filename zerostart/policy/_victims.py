"""Which idle model gives up its place when another needs room: one rule for the server's fleet
and the trace simulator, so that simulated results under memory pressure are the server's.

The rule: the model cheapest to bring back goes first; models whose restart costs are within
``RESTART_TOLERANCE`` of the cheapest count as equally cheap, and of those the least recently
used goes. The tolerance keeps run-to-run noise in measured cold starts (a few tenths of a
second on like models) from overruling recency, while a parked model (a wake) still outranks
a stopped one (a full start) by a wide margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

K = TypeVar("K")

# Restart costs up to this much above the cheapest candidate's count as equal (a ratio).
RESTART_TOLERANCE = 0.5


@dataclass(frozen=True)
class Candidate(Generic[K]):
    """An idle model (or replica) that could be moved down to make room."""

    key: K  # what the caller acts on
    restart_s: float  # seconds to bring it back to HOT from where the move leaves it
    last_active: float  # its last arrival or completion: the least recently used goes first


def choose_victim(candidates: Iterable[Candidate[K]], tolerance: float = RESTART_TOLERANCE) -> K | None:
    """The key of the candidate to move down, or None when there is none (see the module doc)."""
    pool = list(candidates)
    if not pool:
        return None
    cheapest = min(c.restart_s for c in pool)
    bound = cheapest * (1.0 + tolerance)
    best = min((c for c in pool if c.restart_s <= bound), key=lambda c: c.last_active)
    return best.key
