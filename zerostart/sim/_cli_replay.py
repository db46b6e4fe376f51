"""``zerostart replay``: drive a live server with a trace, and set the simulator's prediction of
the same run beside what the server measured.

    zerostart replay --trace data/traces/azure_llm_2023_conv.csv --models 12 --thin 0.1 \\
        --start 600 --duration 600 --speed 3 --config fleet.yaml \\
        --policy ttl:30 ttl:300 hybrid ladder --coldstart coldstart.json --json out.json

With ``--config``, each policy gets a server of its own, started for the purpose from that
config with every model's ``keep_alive_policy`` set to the policy and an empty cache (every
run starts from source). With ``--url``, the running server is driven as it is (name the
policy it runs with ``--policy`` so the simulator runs the same one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from zerostart.policy import CostModel, PolicyError, make
from zerostart.sim._cli import add_workload_arguments, derive_workload, describe_workload, load_costs
from zerostart.sim._compare import fit_service, live_wake_costs, measured, side_by_side, summary
from zerostart.sim._live import LiveRun, drive, served_models
from zerostart.sim._local import LocalServer
from zerostart.sim._replay import Capacity, Service, Start, replay
from zerostart.sim._report import write_json
from zerostart.sim._traces import Trace

DEFAULT_POLICIES = ("ttl:30", "ttl:300", "hybrid", "ladder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_workload_arguments(parser, live=True)
    s = parser.add_argument_group("the server")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running zerostart server (http://host:port)")
    where.add_argument("--config", metavar="FILE", help="start a server from this config for each policy")
    s.add_argument("--api-key", help="bearer token for a server that requires one")
    s.add_argument("--policy", nargs="+", action="extend", metavar="SPEC",
                   help=f"policies to run (with --config; default {' '.join(DEFAULT_POLICIES)}), or the one the "
                        "--url server runs (for the simulated column)")
    s.add_argument("--workdir", metavar="DIR", help="where started servers keep their config, log and cache "
                   "(default: a temporary directory)")
    p = parser.add_argument_group("the prediction")
    p.add_argument("--coldstart", metavar="FILE",
                   help="the server's wake times, measured by `zerostart coldstart --json` (default: the "
                        "cost model's bandwidth model)")
    p.add_argument("--costs", metavar="FILE", help="cost model overrides (prices; see docs/policy.md)")
    o = parser.add_argument_group("output")
    o.add_argument("--sample-s", type=float, default=0.5, metavar="S", help="scrape /metrics every S seconds")
    o.add_argument("--json", metavar="FILE", help="write every request, the samples and both columns to FILE")


def main(args: argparse.Namespace) -> int:
    costs = load_costs(args.costs, args.coldstart)
    specs = args.policy or ([] if args.url else list(DEFAULT_POLICIES))
    if args.url and len(specs) != 1:
        raise PolicyError("with --url, name the one policy the server runs: --policy SPEC")
    for spec in specs:
        make(spec)  # a bad spec fails before any work
    raw, trace = derive_workload(args)
    print("\n".join(describe_workload(raw, trace)))
    print(f"replaying at {args.speed:g}x: {trace.duration_s / 60:.1f} min of wall time per policy")

    runs = []
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="zerostart-replay-"))
    for spec in specs:
        print(f"\npolicy {spec}:")
        if args.config:
            with LocalServer(args.config, policy=spec, workdir=workdir / _safe(spec)) as server:
                print(f"  server {server.url} (log {server.log_path})")
                runs.append(_run_one(server.url, spec, trace, costs, args))
        else:
            runs.append(_run_one(args.url, spec, trace, costs, args))
        print(side_by_side(runs[-1]["simulated"], runs[-1]["measured"], runs[-1]["simulated_live_wakes"]))

    print("\nsimulated against measured (cold starts, p99 added latency, total cost):")
    print(summary(runs))
    if args.json:
        report = {"workload": {"trace": raw.source, "format": raw.format, "derivation": list(trace.derivation),
                               "models": len(trace.model_names), "requests": len(trace), "speed": args.speed,
                               "seed": args.seed, "coldstart": args.coldstart, "costs": args.costs,
                               "wake_s": dict(costs.measured.get("*", {}))},
                  "host": socket.gethostname(), "cpus": os.cpu_count(), "runs": runs}
        write_json(args.json, report, indent=None)
        print(f"wrote {args.json}")
    return 0


def _run_one(url: str, spec: str, trace: Trace, costs: CostModel, args: argparse.Namespace) -> dict[str, Any]:
    served = served_models(url, trace, args.api_key)
    load_before = _loadavg()
    run = asyncio.run(drive(url, trace, served, api_key=args.api_key, sample_s=args.sample_s, log=print))
    load_after = _loadavg()
    setup = _server_setup(run, served)
    live = measured(run, costs, setup["size_bytes"], spec)
    fit = fit_service(run)
    service = Service(overhead_s=fit[0], prefill_tps=fit[1], decode_tps=fit[2]) if fit else Service()
    live_costs = live_wake_costs(costs, run)
    sim, calibrated = (replay(make(spec), trace, c, capacity=setup["capacity"], service=service,
                              size_bytes=setup["size_bytes"], start=setup["start"])
                       for c in (costs, live_costs))
    print(f"  {live['answered']:,} of {live['requests']:,} answered (errors {live['errors'] or 'none'}); "
          f"driver lateness {run.lateness_s * 1000:.0f} ms; load {load_before} -> {load_after}")
    live_wakes = {k: round(v, 3) for k, v in live_costs.measured.get("*", {}).items()}
    print(f"  simulated with {setup['capacity'].describe()}; {service.describe()}; "
          f"{'fresh start' if setup['start'].fresh else 'models at rest'}")
    print(f"  wake times of the third column (measured in this run where it climbed; a costs file's wake_s): {live_wakes}")
    return {"policy": spec, "url": url, "served": served, "load_before": load_before, "load_after": load_after,
            "service": service.describe(), "capacity": setup["capacity"].describe(), "live_wake_s": live_wakes,
            "measured": live, "simulated": sim, "simulated_live_wakes": calibrated,
            "requests": _columns([vars(r) for r in run.requests]), "samples": _samples(run)}


def _server_setup(run: LiveRun, served: list[str]) -> dict[str, Any]:
    """What the simulator needs to know of the server, from its status: model size (the memory
    estimate), its device's budget, and whether it started with every model at zero."""
    models = {m["name"]: m for m in run.status_before["models"]}
    first = models[served[0]]
    size = int(first.get("memory_estimate_bytes") or 0)
    device = first["device"]
    budget = next((d.get("budget_bytes") for d in run.status_before["devices"] if d["device"] == device), None)
    if budget and size:
        capacity = Capacity(memory_gb=budget / 1e9) if device == "cpu" else Capacity(hot=max(1, budget // size))
    else:
        capacity = Capacity()
    fresh = all(models[n]["state"] == "zero" for n in served)
    keep_images = all(models[n].get("images", "off") != "off" for n in served)
    return {"size_bytes": size, "capacity": capacity, "start": Start(fresh=fresh, keep_images=keep_images)}


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Records as ``{"fields": [...], "rows": [[...], ...]}``, times in milliseconds: a run has
    thousands of them."""
    fields = list(rows[0]) if rows else []
    return {"fields": fields, "rows": [[round(v, 3) if isinstance(v, float) else v for v in r.values()] for r in rows]}


def _samples(run: LiveRun) -> dict[str, Any]:
    """The metrics scrapes as columns: time, replicas per state, bytes reserved, queued, in flight."""
    states = sorted({s for x in run.samples for s in x.replicas})
    rows = [{"t": x.t, **{s: x.replicas.get(s, 0.0) for s in states}, "reserved_bytes": sum(x.reserved.values()),
             "queued": x.queued, "in_flight": x.in_flight} for x in run.samples]
    return _columns(rows)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _safe(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)
