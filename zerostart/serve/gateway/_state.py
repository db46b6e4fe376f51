"""The lifecycle of a replica (one worker process holding one model), and of a model.

A replica moves only along these edges; :func:`check` enforces them. Each edge says what
causes it and what the fleet does on it::

    zero     -> starting   a request arrives (or min_replicas / a pre-warm window / the policy
                           asks): admit its memory, then spawn a worker, or hand the model to
                           the standby worker; wait for it to load (from the ready image when
                           one matches, else from the source)
    starting -> hot        the worker reports ready: held requests are dispatched to it
    starting -> zero       the start failed (load error, worker exit, start timeout, no memory):
                           held requests get 503/504 naming the cause; the model backs off
    hot      -> parking    idle past park_after (or the policy says parked, or evicted from a
                           device with a parkable model) with nothing in flight
    hot      -> stopping   idle past its keep-alive with nothing in flight, or evicted for
                           memory; never with a request in flight or a load in progress
    hot      -> zero       the worker died: its in-flight requests get an error naming the
                           exit; the next request starts a new worker
    parking  -> parked     the worker moved its weights to host RAM and dropped its KV cache;
                           the device bytes it held are returned (on CPU the weights stay
                           counted: host RAM is that device's memory)
    parking  -> hot        the worker refused (not parkable): it stays hot, and stops instead
                           when its keep-alive runs out
    parking  -> stopping   the park failed: the worker is stopped
    parking  -> zero       the worker died while parking
    parked   -> waking     a request arrives (or a floor / the policy wants it hot): admit
                           its device bytes again, then wake it (one climb at a time per model)
    parked   -> stopping   idle past its keep-alive (idle_timeout counts from the last request),
                           or evicted; never while requests wait for it
    parked   -> zero       the worker died while parked
    waking   -> hot        the weights are back at the same addresses: held requests are
                           dispatched; it counts as a cold start of rung ``parked``
    waking   -> stopping   the wake failed: the worker is stopped and held requests get a
                           fresh start
    waking   -> zero       the worker died while waking (held requests get a fresh start)
    stopping -> zero       the worker exited (or was killed after stop_timeout); its memory
                           is returned. A request arriving meanwhile starts a new replica.

A *model's* state is that of its most capable replica: the first of ``hot``, ``waking``,
``starting``, ``parking``, ``parked``, ``stopping`` that any replica is in, else ``zero``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class State(str, enum.Enum):
    ZERO = "zero"  # no worker process
    STARTING = "starting"  # worker spawned (or a standby worker told the model), loading; not yet serving
    HOT = "hot"  # serving requests
    PARKING = "parking"  # moving its weights to host RAM; serves nothing
    PARKED = "parked"  # worker alive, weights in host RAM, KV cache dropped; serves nothing
    WAKING = "waking"  # weights coming back to the device; requests wait for it
    STOPPING = "stopping"  # told to exit; serves nothing new


TRANSITIONS: dict[State, frozenset[State]] = {
    State.ZERO: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.HOT, State.ZERO}),
    State.HOT: frozenset({State.PARKING, State.STOPPING, State.ZERO}),
    State.PARKING: frozenset({State.PARKED, State.HOT, State.STOPPING, State.ZERO}),
    State.PARKED: frozenset({State.WAKING, State.STOPPING, State.ZERO}),
    State.WAKING: frozenset({State.HOT, State.STOPPING, State.ZERO}),
    State.STOPPING: frozenset({State.ZERO}),
}

# Order used to summarize replicas into a model state: the first present wins.
_PRECEDENCE = (State.HOT, State.WAKING, State.STARTING, State.PARKING, State.PARKED, State.STOPPING)

# Replicas that hold (or are about to hold) the model on its device.
WARM = frozenset({State.STARTING, State.HOT, State.WAKING})
# Replicas whose worker is alive and that count against max_replicas.
ALIVE = frozenset({State.STARTING, State.HOT, State.PARKING, State.PARKED, State.WAKING})


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
