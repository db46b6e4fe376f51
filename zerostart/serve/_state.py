"""The lifecycle of a replica (one worker process holding one model), and of a model.

A replica moves only along these edges; :func:`check` enforces them. Each edge says what
causes it and what the fleet does on it::

    zero     -> starting   a request arrives (or min_replicas / a pre-warm window / the policy
                           asks): admit its memory, spawn the worker, wait for it to load
    starting -> hot        the worker reports ready: held requests are dispatched to it
    starting -> zero       the start failed (load error, worker exit, start timeout, no memory):
                           held requests get 503/504 naming the cause; the model backs off
    hot      -> stopping   idle past its keep-alive with nothing in flight, or evicted for
                           memory; never with a request in flight or a load in progress
    hot      -> zero       the worker died: its in-flight requests get an error naming the
                           exit; the next request starts a new worker
    stopping -> zero       the worker exited (or was killed after stop_timeout); its memory
                           is returned. A request arriving meanwhile starts a new replica.

The cold ladder (DESIGN.md §2) adds ``parked`` (hot -> parked -> hot | zero) and ``image``
(zero -> image -> starting) as members and edges of this same table.

A *model's* state is that of its most capable replica: ``hot`` if any replica is hot, else
``starting``, else ``stopping``, else ``zero``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class State(str, enum.Enum):
    ZERO = "zero"  # no worker process
    STARTING = "starting"  # worker spawned, loading; not yet serving
    HOT = "hot"  # serving requests
    STOPPING = "stopping"  # told to exit; serves nothing new


TRANSITIONS: dict[State, frozenset[State]] = {
    State.ZERO: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.HOT, State.ZERO}),
    State.HOT: frozenset({State.STOPPING, State.ZERO}),
    State.STOPPING: frozenset({State.ZERO}),
}

# Order used to summarize replicas into a model state: the first present wins.
_PRECEDENCE = (State.HOT, State.STARTING, State.STOPPING)


class TransitionError(RuntimeError):
    """A lifecycle edge that the table above does not allow (a bug in the fleet)."""


def check(src: State, dst: State, what: str = "replica") -> None:
    if dst not in TRANSITIONS[src]:
        raise TransitionError(f"{what}: {src.value} -> {dst.value} is not a lifecycle transition")


def model_state(replica_states: Iterable[State]) -> State:
    present = set(replica_states)
    for s in _PRECEDENCE:
        if s in present:
            return s
    return State.ZERO
