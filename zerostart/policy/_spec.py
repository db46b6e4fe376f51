"""Policies by name: ``make("ttl:300,down=parked")``.

Grammar: ``NAME[:ARG[,ARG...]]`` where ARG is ``key=value``; a policy with a main argument
(ttl's timeout) also takes it bare (``ttl:300``). Durations take s/m/h/d suffixes (``5m``).

  always                       HOT all the time (min replicas 1)
  ttl:SECONDS                  HOT until idle SECONDS, then down (the server's default keep-alive:
                               ttl:<idle_timeout>,park=<park_after>)
      park=SECONDS             PARKED from this long idle until then (none: never parks)
      down=image               the rung it drops to: parked, image or zero
  hybrid                       Azure's hybrid histogram (Serverless in the Wild, ATC 2020)
      range=4h bin=1m          histogram span and bin width
      head=0.05 tail=0.99      percentiles for the pre-warm and keep-alive windows
      margin=0.1               histogram margin (pre-warm at 0.9 x head, keep until 1.1 x tail)
      cv=2                     bin-count CV below which the histogram is not representative
      min_samples=10           fewer idle times than this: standard keep-alive
      oob=0.5                  share of idle times past the range that switches to the forecast
      ts_margin=0.15           forecast margin (pre-warm at 0.85 F, keep until 1.15 F)
      ts_window=32             idle times the forecast looks at
      keepalive=4h             the standard keep-alive (the histogram range, as in the paper)
      down=image               the rung it drops to
  ladder                       zerostart's cost-aware ladder
      latency=USD_PER_S        value of one second of cold-start wait (default: the cost model's)
      p99=SECONDS              meet this p99 added latency: a steered penalty per slower wake
      rungs=hot+parked+image+zero  rungs it may use (must include hot)
      prewarm=on               allow predictive pre-warm (on/off)
      min_samples=8            idle times needed before learning (break-even schedule before)
      window=256               idle times it learns from (the newest)
      horizon=7d               longest idle time it plans for
      pool=16                  weight, in samples, of the fleet's idle-time shape at the model's scale
      prior=1                  weight, in samples, of the log-uniform prior (before the fleet has data)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zerostart.policy._base import Policy, PolicyError, Rung
from zerostart.policy._costs import CostModel
from zerostart.policy._hybrid import HybridHistogram
from zerostart.policy._ttl import AlwaysWarm, FixedTTL
from zerostart.units import parse_duration


def _down(text: str) -> Rung:
    rung = Rung.parse(text)
    if rung is Rung.HOT:
        raise ValueError("must be parked, image or zero")
    return rung


def _rungs(text: str) -> tuple[Rung, ...]:
    rungs = tuple(Rung.parse(part) for part in text.split("+"))
    if Rung.HOT not in rungs:
        raise ValueError("must include hot")
    return rungs


def _flag(text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    raise ValueError("must be on or off")


def _ladder(costs: CostModel, **kw: Any) -> Policy:
    # it plans with numpy: imported when a ladder is made, so a gateway without one never pays for numpy
    from zerostart.policy._ladder import CostAwareLadder

    return CostAwareLadder(costs, **kw)


# name -> (main argument or None, {argument: (parser, constructor keyword)}, builder)
_Args = dict[str, tuple[Callable[[str], Any], str]]
_SPECS: dict[str, tuple[str | None, _Args, Callable[..., Policy]]] = {
    "always": (None, {}, lambda costs, name, **kw: AlwaysWarm(name=name)),
    "ttl": ("ttl", {"ttl": (parse_duration, "ttl_s"), "park": (parse_duration, "park_s"), "down": (_down, "down")},
            lambda costs, name, **kw: FixedTTL(name=name, **kw)),
    "hybrid": (None, {
        "range": (parse_duration, "range_s"), "bin": (parse_duration, "bin_s"), "head": (float, "head"),
        "tail": (float, "tail"), "margin": (float, "margin"), "cv": (float, "cv"),
        "min_samples": (int, "min_samples"), "oob": (float, "oob"), "ts_margin": (float, "ts_margin"),
        "ts_window": (int, "ts_window"), "keepalive": (parse_duration, "keepalive_s"), "down": (_down, "down"),
    }, lambda costs, name, **kw: HybridHistogram(name=name, **kw)),
    "ladder": (None, {
        "latency": (float, "latency_usd_per_s"), "p99": (parse_duration, "p99_target_s"),
        "rungs": (_rungs, "rungs"), "prewarm": (_flag, "prewarm"), "min_samples": (int, "min_samples"),
        "window": (int, "window"), "horizon": (parse_duration, "horizon_s"), "prior": (float, "prior_weight"),
        "pool": (float, "pool_weight"),
    }, lambda costs, name, **kw: _ladder(costs, name=name, **kw)),
}
POLICY_NAMES: tuple[str, ...] = tuple(sorted(_SPECS))


def make(spec: str, costs: CostModel | None = None) -> Policy:
    """A policy from its spec string (see this module's docstring for names and arguments).

    ``costs`` feeds the cost-aware ladder (prices, wake times, the value of latency); the
    other policies ignore it. Raises :class:`PolicyError` naming the bad part of the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PolicyError(f"empty policy spec; valid policies: {', '.join(POLICY_NAMES)}")
    text = "".join(spec.split())
    name, _, argtext = text.partition(":")
    name = name.lower()
    if name not in _SPECS:
        where = "" if not argtext else f" in {spec!r}"
        raise PolicyError(f"unknown policy {name!r}{where}; valid policies: {', '.join(POLICY_NAMES)}")
    main, schema, build = _SPECS[name]
    kwargs: dict[str, Any] = {}
    seen: set[str] = set()
    for part in argtext.split(",") if argtext else []:
        key, eq, value = part.partition("=")
        if not eq:
            if main is None or main in seen:
                hint = f"key=value arguments ({', '.join(sorted(schema))})" if schema else "no arguments"
                raise PolicyError(f"policy {name!r} takes {hint}; got {part!r} in {spec!r}")
            key, value = main, part
        key = key.lower()
        if key not in schema:
            valid = ", ".join(sorted(schema)) or "none"
            raise PolicyError(f"policy {name!r} has no argument {key!r} (in {spec!r}); valid arguments: {valid}")
        if key in seen:
            raise PolicyError(f"policy {name!r}: argument {key!r} given twice in {spec!r}")
        seen.add(key)
        parse, keyword = schema[key]
        try:
            kwargs[keyword] = parse(value)
        except (ValueError, PolicyError) as e:
            raise PolicyError(f"policy {name!r}: bad value {value!r} for {key!r} in {spec!r}: {e}") from None
    if main is not None and main not in seen:
        raise PolicyError(f"policy {name!r} needs its {main} argument, e.g. {name}:300 (in {spec!r})")
    canonical = name + (f":{argtext}" if argtext else "")
    return build(costs or CostModel(), canonical, **kwargs)


def describe() -> str:
    """The policy names and arguments, for command-line help."""
    return __doc__.split("\n\n", 2)[2] if __doc__ else ""

