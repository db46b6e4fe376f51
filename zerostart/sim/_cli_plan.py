"""``zerostart plan``: the break-even calculator. Is scale-to-zero worth it, and at what idle
timeout? Prints every number with the arithmetic that produced it.

    zerostart plan --params 8B --rate 20
    zerostart plan --model-gb 140 --rate 300 --source-gbps 3 --p99 2
    zerostart plan --coldstart cold.json --rate 6 --pattern periodic

Traffic is one model's requests at ``--rate`` per hour, either Poisson (independent arrivals)
or periodic (exactly evenly spaced). Service time is left out: idle gaps are taken as the full
spacing between requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from zerostart.policy import LADDER, CostModel, PolicyError, Rung
from zerostart.sim._cli import load_costs

_DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_params(text: str) -> float:
    """``8B`` -> 8e9, ``560M`` -> 5.6e8, ``7000000000`` -> 7e9."""
    t = text.strip().lower()
    scale = _SUFFIX.get(t[-1:], None)
    try:
        n = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise PolicyError(f"bad --params {text!r}: expected a count like 8B, 70B or 560M") from None
    if not n > 0:
        raise PolicyError(f"bad --params {text!r}: must be positive")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    m = parser.add_argument_group("model")
    size = m.add_mutually_exclusive_group()
    size.add_argument("--model-gb", type=float, metavar="GB", help="weights in GB (10^9 bytes)")
    size.add_argument("--params", metavar="N", help="parameter count (8B, 70B, 560M); with --dtype")
    m.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), default="bf16", help="with --params (default bf16)")
    t = parser.add_argument_group("traffic")
    t.add_argument("--rate", type=float, default=12.0, metavar="R", help="requests per hour (default 12)")
    t.add_argument("--pattern", choices=("poisson", "periodic"), default="poisson",
                   help="independent arrivals or evenly spaced ones (default poisson)")
    t.add_argument("--p99", type=float, metavar="S", help="p99 added-latency target in seconds")
    c = parser.add_argument_group("prices and loader speed (default: the cost model's, see docs/policy.md)")
    c.add_argument("--costs", metavar="FILE", help="cost model file (YAML or JSON)")
    c.add_argument("--coldstart", metavar="FILE", help="wake times measured by `zerostart coldstart --json`")
    c.add_argument("--gpu-usd-per-hour", type=float, metavar="USD", help="device price per hour")
    c.add_argument("--ram-usd-per-gb-hour", type=float, metavar="USD", help="host RAM price per GB-hour")
    c.add_argument("--disk-usd-per-gb-month", type=float, metavar="USD", help="disk price per GB-month")
    c.add_argument("--latency-usd-per-s", type=float, metavar="USD", help="value of one second a request waits")
    c.add_argument("--h2d-gbps", type=float, metavar="GB/S", help="host-to-device copy speed (parked wakes)")
    c.add_argument("--disk-gbps", type=float, metavar="GB/S", help="image read speed (image wakes)")
    c.add_argument("--source-gbps", type=float, metavar="GB/S", help="checkpoint fetch speed (wakes from zero)")
    c.add_argument("--standby", action="store_true", help="a standby worker skips spawn, import and device init")


@dataclass(frozen=True)
class Option:
    """Stay HOT for ``ttl_s`` after each request, then rest on ``rung`` (None: never drop)."""

    label: str
    usd_per_hour: float  # devices, RAM, disk
    latency_usd_per_hour: float
    cold_fraction: float  # of requests that wait for a climb
    wait_s: float  # how long those wait


def options(costs: CostModel, size: int, rate: float, pattern: str) -> list[Option]:
    """Always warm, and HOT-for-T-then-rung for each rung and a few T, at ``rate`` per hour."""
    mu = 3600.0 / rate  # mean seconds between requests
    hot = costs.hold_usd_per_s(Rung.HOT, size)
    lam = costs.latency_usd_per_s
    out = [Option("always warm", hot * 3600.0, 0.0, 0.0, 0.0)]
    for rung in LADDER[1:]:
        hold = costs.hold_usd_per_s(rung, size)
        wake = costs.wake_s(rung, size, "*")
        be = costs.break_even_s(Rung.HOT, rung, size, "*")
        ttls = sorted({0.0, 30.0, 300.0, 3600.0} | ({round(be, 1)} if math.isfinite(be) else set()))
        for ttl in ttls:
            if pattern == "poisson":
                cold = math.exp(-ttl / mu)
                hot_s = mu * (1.0 - cold)  # E[min(gap, ttl)]
                low_s = mu * cold  # E[(gap - ttl)+]
            else:
                cold = 1.0 if ttl < mu else 0.0
                hot_s, low_s = min(ttl, mu), max(0.0, mu - ttl)
            per_gap = hot * hot_s + hold * low_s + cold * wake * hot  # the device is held while climbing
            tag = " (break-even)" if ttl == round(be, 1) else ""
            out.append(Option(f"hot {_dur(ttl)}{tag}, then {rung.value}", rate * per_gap,
                              rate * cold * wake * lam, cold, wake))
        if pattern == "periodic" and wake < mu:
            # Known spacing: rest low at once and climb just in time; nobody waits.
            per_gap = hold * (mu - wake) + hot * wake
            out.append(Option(f"{rung.value} at once, pre-warm {wake:.1f} s ahead", rate * per_gap, 0.0, 0.0, 0.0))
    return out


def _dur(s: float) -> str:
    if s == 0:
        return "0 s"
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.3g} min"
    if s < 3 * 86400:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.3g} days"


def _usd(x: float) -> str:
    return f"${x:.4f}" if abs(x) < 1 else f"${x:,.2f}"


def main(args: argparse.Namespace) -> int:
    costs = load_costs(args.costs, args.coldstart)
    overrides = {"device_usd_per_hour": args.gpu_usd_per_hour, "host_ram_usd_per_gb_hour": args.ram_usd_per_gb_hour,
                 "disk_usd_per_gb_month": args.disk_usd_per_gb_month, "latency_usd_per_s": args.latency_usd_per_s,
                 "h2d_gbps": args.h2d_gbps, "disk_gbps": args.disk_gbps, "source_gbps": args.source_gbps}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.standby:
        overrides["standby"] = True
    if args.model_gb is not None:
        overrides["model_gb"] = args.model_gb
    elif args.params is not None:
        overrides["model_gb"] = parse_params(args.params) * _DTYPE_BYTES[args.dtype] / 1e9
    costs = dataclasses.replace(costs, **overrides)  # validated again on construction
    if not args.rate > 0:
        raise PolicyError(f"--rate must be a positive number of requests per hour, got {args.rate}")
    if args.p99 is not None and args.p99 < 0:
        raise PolicyError(f"--p99 must not be negative, got {args.p99}")
    for line in plan_lines(costs, args.rate, args.pattern, args.p99):
        print(line)
    return 0


def plan_lines(costs: CostModel, rate: float, pattern: str, p99: float | None) -> list[str]:
    """The whole printout, line by line."""
    head = f"model: {costs.model_gb:g} GB of weights" + (
        " (standby worker: no spawn/import/device init)" if costs.standby else "")
    return [head, "", *_holding(costs), "", *_wakes(costs), "", *_break_even(costs), "",
            *_traffic(costs, rate, pattern, p99)]


def _holding(costs: CostModel) -> list[str]:
    gb, size = costs.model_gb, 0  # size 0: the cost model's model_gb
    holding = [
        (Rung.HOT, f"{costs.device_usd_per_hour:g} $/device-h x {costs.device_share:g} device"),
        (Rung.PARKED, f"({gb:g} GB + {costs.worker_ram_gb:g} GB worker) x {costs.host_ram_usd_per_gb_hour:g} $/GB-h"),
        (Rung.IMAGE, f"{gb:g} GB x {costs.disk_usd_per_gb_month:g} $/GB-month / 730 h"),
        (Rung.ZERO, "nothing held"),
    ]
    return ["holding cost per hour"] + [
        f"  {rung.value:<7} {expr:<55} = {_usd(costs.hold_usd_per_s(rung, size) * 3600)}/h" for rung, expr in holding]


def _wakes(costs: CostModel) -> list[str]:
    gb, size = costs.model_gb, 0
    hot, lam = costs.hold_usd_per_s(Rung.HOT, size), costs.latency_usd_per_s
    spawn = 0.0 if costs.standby else costs.spawn_s
    formulas = {
        Rung.PARKED: f"{costs.parked_fixed_s:g} s + {gb:g} GB / {costs.h2d_gbps:g} GB/s",
        Rung.IMAGE: f"{spawn:g} s spawn + {costs.image_warmup_s:g} s warm-up + {gb:g} GB / "
                    f"{min(costs.disk_gbps, costs.h2d_gbps):g} GB/s",
        Rung.ZERO: f"{spawn:g} s spawn + {costs.source_warmup_s:g} s prepare/warm-up + {gb:g} GB / "
                   f"{min(costs.source_gbps, costs.h2d_gbps):g} GB/s",
    }
    L = ["wake to hot"]
    for rung in LADDER[1:]:
        how = "measured (coldstart telemetry)" if costs.wake_source(rung, "*") == "measured" else formulas[rung]
        L.append(f"  {rung.value:<7} {how:<55} = {costs.wake_s(rung, size, '*'):.2f} s")
    L.append("")
    L.append(f"cost of one wake = seconds x ({lam:g} $/s a request waits + {hot:.6f} $/s device held while loading)")
    for rung in LADDER[1:]:
        expr = f"{costs.wake_s(rung, size, '*'):.2f} s x {lam + hot:.6f} $/s"
        L.append(f"  {rung.value:<7} {expr:<55} = {_usd(costs.wake_usd(rung, size, '*'))}")
    return L


def _break_even(costs: CostModel) -> list[str]:
    size = 0
    L = ["break-even idle time (stay on the upper rung until its extra holding cost equals the lower rung's "
         "extra wake cost; never worse than 2x the best choice made in hindsight)"]
    for upper, lower in ((Rung.HOT, Rung.PARKED), (Rung.PARKED, Rung.IMAGE), (Rung.IMAGE, Rung.ZERO),
                         (Rung.HOT, Rung.IMAGE), (Rung.HOT, Rung.ZERO)):
        dw = costs.wake_usd(lower, size, "*") - costs.wake_usd(upper, size, "*")
        dc = (costs.hold_usd_per_s(upper, size) - costs.hold_usd_per_s(lower, size)) * 3600
        be = costs.break_even_s(upper, lower, size, "*")
        expr = f"{_usd(dw)} / {_usd(dc)}/h"
        L.append(f"  {upper.value + ' -> ' + lower.value:<16} {expr:<46} = "
                 f"{_dur(be) if math.isfinite(be) else 'never'}")
    return L


def _traffic(costs: CostModel, rate: float, pattern: str, p99: float | None) -> list[str]:
    """The strategies priced at this traffic, and the verdict."""
    lam, mu = costs.latency_usd_per_s, 3600.0 / rate
    L = [f"traffic: {rate:g} requests/hour, {pattern}: mean idle gap 3600 / {rate:g} = {_dur(round(mu, 1))}"
         + ("" if pattern == "periodic" else f"; P(gap > T) = exp(-T / {mu:.0f} s)")]
    opts = options(costs, 0, rate, pattern)
    L.append(f"  {'strategy':<44} {'$/h':>9} {'+latency $/h':>13} {'cold':>7} {'wait':>7}")
    for o in opts:
        L.append(f"  {o.label:<44} {o.usd_per_hour:>9.4f} {o.latency_usd_per_hour:>13.4f} "
                 f"{o.cold_fraction:>7.1%} {o.wait_s:>6.2f}s")
    L.append("")
    always = opts[0]
    eligible = [o for o in opts if p99 is None or o.cold_fraction <= 0.01 or o.wait_s <= p99]
    best = min(eligible, key=lambda o: o.usd_per_hour + o.latency_usd_per_hour)
    cheapest = min(eligible, key=lambda o: o.usd_per_hour)
    if p99 is not None:
        L.append(f"p99 target {p99:g} s: a strategy qualifies if at most 1% of requests wait or its wait is "
                 f"within the target ({len(eligible)} of {len(opts)} do)")
    L.append(f"best, counting latency at {lam:g} $/s: {best.label}: {_usd(best.usd_per_hour)}/h + "
             f"{_usd(best.latency_usd_per_hour)}/h latency vs always warm {_usd(always.usd_per_hour)}/h")
    saving = 1.0 - cheapest.usd_per_hour / always.usd_per_hour
    L.append(f"cheapest: {cheapest.label}: {_usd(cheapest.usd_per_hour)}/h, {saving:.1%} less than always warm, "
             f"{cheapest.cold_fraction:.1%} of requests wait {cheapest.wait_s:.2f} s")
    if best is always:
        L.append("verdict: stay warm: at this rate a wake costs more than the idle time it saves.")
    else:
        L.append(f"verdict: scale down: {best.label}.")
    if pattern == "poisson":
        L.append("note: with independent arrivals the wait so far says nothing about the wait to come, so the best "
                 "fixed timeout is 0 or forever; the break-even timeouts are the robust choice when arrivals "
                 "come in bursts (zerostart simulate measures this on real traces).")
    return L
