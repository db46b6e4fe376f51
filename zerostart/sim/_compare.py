"""A live replay next to the simulator's prediction of it: the measured columns from what the
server answered and reported (``_live.LiveRun``), the simulated ones from ``replay`` on the same
trace slice with the server's measured wake times, and the tables that put them side by side.

Measured, like the simulator counts them:

* cold starts by rung: the server's ``zerostart_cold_starts_total`` increase (one per climb; the
  requests that join a climb are delayed but start nothing) less its ``zerostart_climbs_ahead_total``
  (climbs begun with no request waiting: pre-warms, which the simulator counts apart), each
  ``rung`` label (a :class:`~zerostart.names.Climb`) counted on the rung it climbed from;
* added latency: each answered request's ``x-zerostart-cold-start-ms`` (arrival at the gateway
  until its replica was ready), requests without an answer left out and counted;
* rung-hours: replicas per state from ``/metrics``, integrated from the first arrival to the
  last answer. The device is held by replicas starting, hot, waking, parking or stopping (the
  simulator moves down instantly; the server pays those moves), host RAM by parked ones;
* cost: those hours priced by the same cost model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from zerostart.names import LADDER
from zerostart.policy import CostModel, Rung
from zerostart.sim._live import LiveRun

DEVICE_STATES = ("starting", "hot", "waking", "parking", "stopping")


def measured(run: LiveRun, costs: CostModel, size_bytes: int, policy: str) -> dict[str, Any]:
    """The live run's columns, with the simulator's result keys where they mean the same."""
    answered = [r for r in run.requests if r.status and r.cold_start_s is not None]
    lat = np.asarray([r.cold_start_s for r in answered]) if answered else np.zeros(1)
    t0 = min(r.at for r in run.requests)
    t1 = max(r.done for r in run.requests)
    state_s = _state_seconds(run, t0, t1)
    device_s = sum(state_s.get(s, 0.0) for s in DEVICE_STATES)
    parked_s = state_s.get("parked", 0.0)
    gb = costs.size_gb(size_bytes)
    gpu_hours = device_s * costs.device_share / 3600.0
    ram_gb_hours = parked_s * (gb + costs.worker_ram_gb) / 3600.0
    by_rung = {r.value: 0 for r in LADDER[1:]}  # parked, image, zero
    for climb, n in run.cold_starts.items():
        by_rung[climb.rung.value] += int(round(n - run.climbs_ahead.get(climb, 0.0)))
    p50, p95, p99 = (float(x) for x in np.percentile(lat, [50, 95, 99]))
    gpu_usd = gpu_hours * costs.device_usd_per_hour
    ram_usd = ram_gb_hours * costs.host_ram_usd_per_gb_hour
    n_models = len({r.model for r in run.requests})
    always = n_models * (t1 - t0) * costs.hold_usd_per_s(Rung.HOT, size_bytes)
    errors: dict[str, int] = {}
    for r in run.requests:
        if r.status != 200:
            key = str(r.status or "no answer")
            errors[key] = errors.get(key, 0) + 1
    return {
        "policy": policy,
        "requests": len(run.requests),
        "answered": len(answered),
        "errors": errors,
        "hours": (t1 - t0) / 3600.0,
        "cold_starts": sum(by_rung.values()),
        "cold_starts_by_rung": by_rung,
        "cold_starts_by_label": {k.value: int(round(v)) for k, v in run.cold_starts.items()},
        "prewarms": int(round(sum(run.climbs_ahead.values()))),
        "cold_start_s_by_label": {k.value: v["sum"] / v["count"] for k, v in run.cold_start_seconds.items()
                                  if v["count"]},
        "delayed_requests": int((lat > 0).sum()),
        "p50_added_latency_s": p50,
        "p95_added_latency_s": p95,
        "p99_added_latency_s": p99,
        "max_added_latency_s": float(lat.max()),
        "mean_added_latency_s": float(lat.mean()),
        "state_hours": {k: v / 3600.0 for k, v in state_s.items()},
        "rung_hours": {"hot": device_s / 3600.0, "parked": parked_s / 3600.0},
        "gpu_hours": gpu_hours,
        "host_ram_gb_hours": ram_gb_hours,
        "memory_gb_hours": _reserved_gb_s(run, t0, t1) / 3600.0,
        "gpu_usd": gpu_usd,
        "host_ram_usd": ram_usd,
        "total_cost_usd": gpu_usd + ram_usd,
        "always_warm_cost_usd": always,
        "cost_vs_always_warm": (gpu_usd + ram_usd) / always if always > 0 else math.nan,
        "lateness_s": run.lateness_s,
    }


def _state_seconds(run: LiveRun, t0: float, t1: float) -> dict[str, float]:
    """Replica-seconds in each state between ``t0`` and ``t1``: each scrape's counts held until
    the next scrape."""
    out: dict[str, float] = {}
    for a, b in zip(run.samples, run.samples[1:]):
        lo, hi = max(a.t, t0), min(b.t, t1)
        if hi <= lo:
            continue
        for state, n in a.replicas.items():
            out[state] = out.get(state, 0.0) + n * (hi - lo)
    return out


def _reserved_gb_s(run: LiveRun, t0: float, t1: float) -> float:
    total = 0.0
    for a, b in zip(run.samples, run.samples[1:]):
        lo, hi = max(a.t, t0), min(b.t, t1)
        if hi > lo:
            total += sum(a.reserved.values()) / 1e9 * (hi - lo)
    return total


def live_wake_costs(costs: CostModel, run: LiveRun) -> CostModel:
    """``costs`` with the wake time of each rung the live run climbed from replaced by the mean
    the server measured for it (``zerostart_cold_start_seconds``): the simulator calibrated on
    the run it predicts, which separates a wrong wake time from a wrong model of the fleet."""
    sums: dict[str, list[float]] = {}
    for climb, v in run.cold_start_seconds.items():
        if v["count"]:
            acc = sums.setdefault(climb.rung.value, [0.0, 0.0])
            acc[0] += v["sum"]
            acc[1] += v["count"]
    if not sums:
        return costs
    table = dict(costs.measured.get("*", {}))
    table.update({rung: total / n for rung, (total, n) in sums.items()})
    return dataclasses.replace(costs, measured={**costs.measured, "*": table})


def fit_service(run: LiveRun) -> tuple[float, float, float] | None:
    """(overhead s, prefill tokens/s, decode tokens/s) fitted by least squares to the requests
    that waited for nothing (a term that fits negative is dropped); None with too few."""
    rows = [(r.done - r.sent - (r.queue_s or 0.0), r.usage.get("prompt_tokens", r.prompt_tokens),
             r.usage.get("completion_tokens", r.max_tokens)) for r in run.requests
            if r.status == 200 and r.cold_start_s == 0.0]
    if len(rows) < 10:
        return None
    y = np.asarray([row[0] for row in rows])
    x = np.asarray([[1.0, row[1], row[2]] for row in rows])
    keep = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        bad = [k for k, c in zip(keep, coef) if c <= 0 and k != 0]
        if not bad:
            break
        keep.remove(bad[0])
    full = dict(zip(keep, coef))
    overhead = max(0.0, float(full.get(0, 0.0)))
    prefill = 1.0 / full[1] if 1 in full else math.inf
    decode = 1.0 / full[2] if 2 in full else math.inf
    return overhead, prefill, decode


def side_by_side(sim: dict[str, Any], live: dict[str, Any], calibrated: dict[str, Any] | None = None) -> str:
    """One policy: simulated (and simulated with the live run's wake times), measured, and the
    ratio measured / simulated, one line per quantity."""
    columns = [("simulated", sim)] + ([("sim, live wakes", calibrated)] if calibrated else []) + [("measured", live)]

    def counts(r: dict[str, Any]) -> str:
        c = r["cold_starts_by_rung"]
        return f"{c['parked']}/{c['image']}/{c['zero']}"

    rows = [("", *(name for name, _ in columns), "measured/sim"),
            ("cold starts parked/image/zero", *(counts(r) for _, r in columns), "")]
    for label, key, fmt in (("cold starts", "cold_starts", "{:.0f}"),
                            ("pre-warms", "prewarms", "{:.0f}"),
                            ("delayed requests", "delayed_requests", "{:.0f}"),
                            ("p50 added s", "p50_added_latency_s", "{:.2f}"),
                            ("p95 added s", "p95_added_latency_s", "{:.2f}"),
                            ("p99 added s", "p99_added_latency_s", "{:.2f}"),
                            ("max added s", "max_added_latency_s", "{:.2f}"),
                            ("device hours", "gpu_hours", "{:.3f}"),
                            ("parked GB-hours", "host_ram_gb_hours", "{:.4f}"),
                            ("memory GB-hours", "memory_gb_hours", "{:.4f}"),
                            ("total $", "total_cost_usd", "{:.4f}")):
        rows.append((label, *(fmt.format(r[key]) for _, r in columns), ratio(live[key], sim[key])))
    return _grid(rows, header=False)


def summary(runs: list[dict[str, Any]]) -> str:
    """Every policy on one line: cold starts, p99 and cost, simulated / measured / ratio (and the
    p99 simulated with the live run's wake times, where a run has it)."""
    head = ("policy", "cold sim", "cold live", "ratio", "p99 sim", "p99 sim*", "p99 live", "ratio",
            "$ sim", "$ live", "ratio")
    rows: list[tuple[str, ...]] = [head]
    for run in runs:
        sim, live = run["simulated"], run["measured"]
        cal = run.get("simulated_live_wakes")
        rows.append((sim["policy"], str(sim["cold_starts"]), str(live["cold_starts"]),
                     ratio(live["cold_starts"], sim["cold_starts"]),
                     f"{sim['p99_added_latency_s']:.2f}", f"{cal['p99_added_latency_s']:.2f}" if cal else "-",
                     f"{live['p99_added_latency_s']:.2f}", ratio(live["p99_added_latency_s"], sim["p99_added_latency_s"]),
                     f"{sim['total_cost_usd']:.4f}", f"{live['total_cost_usd']:.4f}",
                     ratio(live["total_cost_usd"], sim["total_cost_usd"])))
    return _grid(rows, header=True) + "\n(p99 sim*: simulated with the wake times the server measured in the run)"


def _grid(rows: list[tuple[str, ...]], header: bool) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) for r in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio(measured_value: float, simulated_value: float) -> str:
    if simulated_value == 0:
        return "=" if measured_value == 0 else "-"
    return f"{measured_value / simulated_value:.2f}"
