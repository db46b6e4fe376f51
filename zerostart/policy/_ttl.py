"""The two baselines: always warm, and a fixed idle timeout.

  always                  HOT forever (Ray Serve / KServe min_replicas: 1)
  ttl:SECONDS[,park=S]    HOT until SECONDS idle, then down to one rung (Ollama keep_alive 5m =
                          ttl:300, Knative's scale-to-zero grace period 30 s = ttl:30); with
                          park=S, PARKED from S idle until then. The server's default keep-alive
                          is this policy: ttl:<idle_timeout>[,park=<park_after>]
"""

from __future__ import annotations

import math

from zerostart.policy._base import Decision, ModelView, PolicyError, Rung, usable

_HOT = Decision(Rung.HOT, reason="always warm")
_BUSY = Decision(Rung.HOT, reason="busy")


class AlwaysWarm:
    """Every model HOT all the time: no cold starts after the first, the most device time."""

    rungs: tuple[Rung, ...] = (Rung.HOT,)

    def __init__(self, name: str = "always") -> None:
        self.name = name

    def observe_arrival(self, model: str, t: float) -> None:
        pass

    def observe_completion(self, model: str, t: float) -> None:
        pass

    def decide(self, view: ModelView, now: float) -> Decision:
        return _HOT


class FixedTTL:
    """HOT while idle for less than ``ttl_s``, then ``down``; with ``park_s``, PARKED from
    ``park_s`` idle until then (when parking comes first and the model can park). No pre-warm,
    no learning: it never climbs a model, it only lets one go (a model that went down early,
    for memory or a crash, climbs again with its next request).

    Idle counts from ``view.last_active`` for parking and from ``view.timeout_from`` (when given)
    for the timeout: a request that asked for a keep-alive of its own holds the model for that
    long instead of this timeout (the caller holds it), and still puts off parking."""

    def __init__(self, ttl_s: float, down: Rung = Rung.IMAGE, name: str | None = None,
                 park_s: float | None = None) -> None:
        if not ttl_s >= 0:
            raise PolicyError(f"ttl: the idle timeout must be a non-negative number of seconds, got {ttl_s!r}")
        if down is Rung.HOT:
            raise PolicyError("ttl: down=hot would never scale down; use the 'always' policy")
        if park_s is not None and not park_s >= 0:
            raise PolicyError(f"ttl: park must be a non-negative number of seconds, got {park_s!r}")
        if park_s is not None and down is Rung.PARKED:
            raise PolicyError("ttl: park= parks before the timeout; with down=parked, leave park out")
        self.ttl_s = float(ttl_s)
        self.park_s = None if park_s is None else float(park_s)
        self.down = down
        self.rungs: tuple[Rung, ...] = (Rung.HOT, down) if park_s is None else (Rung.HOT, Rung.PARKED, down)
        self.name = name or f"ttl:{ttl_s:g}" + ("" if park_s is None else f",park={park_s:g}")
        self._down = Decision(down, reason=f"idle past the {self.ttl_s:g} s timeout")

    def observe_arrival(self, model: str, t: float) -> None:
        pass

    def observe_completion(self, model: str, t: float) -> None:
        pass

    def decide(self, view: ModelView, now: float) -> Decision:
        if view.busy:
            return _BUSY
        since = view.last_active if view.timeout_from is None else view.timeout_from
        until = since + self.ttl_s if since > -math.inf else -math.inf  # nothing since: nothing holds it
        if now >= until:
            down = usable(self.down, view)
            if down is not self.down:  # this model's engine cannot rest on ``down``: the next rung below
                return Decision(down, reason=f"idle past the {self.ttl_s:g} s timeout ({self.down.value} is not "
                                             f"available to this model)")
            return self._down
        park_at = math.inf
        if self.park_s is not None and Rung.PARKED in view.rungs:
            park_at = view.last_active + self.park_s
        if now >= park_at:
            rung, recheck, reason = Rung.PARKED, until, f"idle past parking at {self.park_s:g} s"
        else:
            rung, recheck, reason = Rung.HOT, min(park_at, until), "idle within the timeout"
        if rung.level < view.rung.level:  # below already (moved down for memory, or it crashed): stay
            rung, recheck, reason = view.rung, until, "a fixed timeout climbs nothing"
        return Decision(rung, recheck_at=recheck, reason=reason)
