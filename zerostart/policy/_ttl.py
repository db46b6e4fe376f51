"""The two baselines: always warm, and a fixed idle timeout.

  always       HOT forever (Ray Serve / KServe min_replicas: 1)
  ttl:SECONDS  HOT until SECONDS idle, then down to one rung (Ollama keep_alive 5m = ttl:300,
               Knative's scale-to-zero grace period 30 s = ttl:30)
"""

from __future__ import annotations

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
    """HOT while idle for less than ``ttl_s``, then ``down``; no pre-warm, no learning."""

    def __init__(self, ttl_s: float, down: Rung = Rung.IMAGE, name: str | None = None) -> None:
        if not ttl_s >= 0:
            raise PolicyError(f"ttl: the idle timeout must be a non-negative number of seconds, got {ttl_s!r}")
        if down is Rung.HOT:
            raise PolicyError("ttl: down=hot would never scale down; use the 'always' policy")
        self.ttl_s = float(ttl_s)
        self.down = down
        self.rungs: tuple[Rung, ...] = (Rung.HOT, down)
        self.name = name or f"ttl:{ttl_s:g}"
        self._down = Decision(down, reason=f"idle past the {self.ttl_s:g} s timeout")

    def observe_arrival(self, model: str, t: float) -> None:
        pass

    def observe_completion(self, model: str, t: float) -> None:
        pass

    def decide(self, view: ModelView, now: float) -> Decision:
        if view.busy:
            return _BUSY
        until = view.last_active + self.ttl_s
        if now < until:
            return Decision(Rung.HOT, recheck_at=until, reason="idle within the timeout")
        down = usable(self.down, view)
        if down is not self.down:  # this model's engine cannot rest on ``down``: the next rung below
            return Decision(down, reason=f"idle past the {self.ttl_s:g} s timeout ({self.down.value} is not "
                                         f"available to this model)")
        return self._down
