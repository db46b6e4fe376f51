"""``zerostart simulate``: replay a request trace against keep-alive policies.

    zerostart simulate --trace azure_llm_2023_conv.csv --models 50 --stretch 24 \\
        --policy always ttl:300 hybrid ladder --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zerostart.policy import CostModel, PolicyError, describe, make
from zerostart.sim._derive import derive
from zerostart.sim._replay import Capacity, Service, replay
from zerostart.sim._report import plot, table, write_json
from zerostart.sim._traces import FORMATS, Trace, TraceError, load_trace

DEFAULT_POLICIES = ("always", "ttl:30", "ttl:300", "hybrid", "ladder")
DEFAULT_MODELS = 50  # models a single-service trace is split into when --models is not given


def add_workload_arguments(parser: argparse.ArgumentParser, *, live: bool = False) -> None:
    """The trace and how a workload is derived from it (shared with ``zerostart replay``)."""
    w = parser.add_argument_group("workload")
    w.add_argument("--trace", required=True, metavar="FILE", help="request trace to replay")
    w.add_argument("--format", choices=FORMATS, help="trace format (default: guessed from the file)")
    w.add_argument("--models", type=int, metavar="N",
                   help=f"split a single-service trace across N models (default {DEFAULT_MODELS})")
    w.add_argument("--popularity", default="zipf:1.0", metavar="LAW",
                   help="how requests spread over the models: zipf:S or uniform (default zipf:1.0)")
    w.add_argument("--start", type=float, default=0.0, metavar="S",
                   help="begin S seconds into the trace (default 0)")
    w.add_argument("--duration", type=float, metavar="S",
                   help="seconds of the workload to replay, after --stretch / --speed (default: to the end)")
    if not live:
        w.add_argument("--stretch", type=float, default=1.0, metavar="X", help="multiply timestamps by X (default 1)")
    w.add_argument("--speed", type=float, default=1.0, metavar="X",
                   help="compress time X-fold: a live replay's clock (the same as --stretch 1/X; default 1)")
    w.add_argument("--thin", type=float, default=1.0, metavar="F", help="keep each request with probability F")
    if not live:
        w.add_argument("--repeat", type=int, default=1, metavar="K", help="replay the trace K times back to back")
    w.add_argument("--seed", type=int, default=0, help="seed of every random step (default 0)")
    w.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="cap each request's prompt tokens at N" + (" (default 64)" if live else ""),
                   default=64 if live else None)
    w.add_argument("--max-output-tokens", type=int, metavar="N",
                   help="cap each request's output tokens at N" + (" (default 16)" if live else ""),
                   default=16 if live else None)


def derive_workload(args: argparse.Namespace) -> tuple[Trace, Trace]:
    """The trace as read, and the workload derived from it by the workload arguments."""
    if not args.speed > 0:
        raise TraceError(f"--speed must be positive, got {args.speed}")
    raw = load_trace(args.trace, args.format)
    models = args.models
    if models is None and raw.single_service:
        models = DEFAULT_MODELS
    trace = derive(raw, models=models, popularity=args.popularity, stretch=getattr(args, "stretch", 1.0) / args.speed,
                   thin=args.thin, repeat=getattr(args, "repeat", 1), seed=args.seed, start=args.start,
                   duration=args.duration, max_input_tokens=args.max_prompt_tokens,
                   max_output_tokens=args.max_output_tokens)
    return raw, trace


def describe_workload(raw: Trace, trace: Trace) -> list[str]:
    lines = [f"trace: {raw.source} ({raw.format}), {len(raw):,} requests over {raw.duration_s / 3600:.2f} h"]
    if trace.derivation:
        lines.append("derived workload (the same flags and seed give the same workload):")
        lines += [f"  - {step}" for step in trace.derivation]
    lines.append(f"workload: {len(trace):,} requests for {len(trace.model_names)} models over "
                 f"{trace.duration_s / 3600:.2f} h")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "policies (--policy NAME[:ARG,...]):\n" + describe()
    add_workload_arguments(parser)
    w = parser.add_argument_group("service time")
    w.add_argument("--prefill-tps", type=float, default=Service.prefill_tps, metavar="T",
                   help=f"prompt tokens per second a request is busy for (default {Service.prefill_tps:g})")
    w.add_argument("--decode-tps", type=float, default=Service.decode_tps, metavar="T",
                   help=f"output tokens per second a request is busy for (default {Service.decode_tps:g})")
    w.add_argument("--service-s", type=float, default=Service.fixed_s, metavar="S",
                   help=f"seconds busy per request when the trace has no tokens (default {Service.fixed_s:g})")
    p = parser.add_argument_group("fleet and costs")
    p.add_argument("--policy", nargs="+", action="extend", metavar="SPEC",
                   help=f"policies to compare (default: {' '.join(DEFAULT_POLICIES)})")
    p.add_argument("--costs", metavar="FILE", help="cost model overrides (YAML or JSON; see docs/policy.md)")
    p.add_argument("--coldstart", metavar="FILE",
                   help="wake times measured by `zerostart coldstart --json`, applied to every model")
    p.add_argument("--model-gb", type=float, metavar="GB", help="size of every model (default: the cost model's, "
                   "or the coldstart file's bytes)")
    p.add_argument("--capacity", default="unlimited", metavar="hot=N,parked=M",
                   help="models that fit HOT / PARKED at once, or memory_gb=G,kv_gb=K: one memory budget that "
                   "hot and parked models share, as on a CPU server (default unlimited)")
    o = parser.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write one JSON object per policy to FILE (a list)")
    o.add_argument("--plot", metavar="FILE.png", help="plot total cost against p99 added latency")


def load_costs(costs_file: str | None, coldstart_file: str | None) -> CostModel:
    costs = CostModel.from_file(costs_file) if costs_file else CostModel()
    if coldstart_file:
        path = Path(coldstart_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PolicyError(f"coldstart file {path}: not valid JSON: {e}") from None
        try:
            costs = costs.with_coldstart(data, model="*")
        except PolicyError as e:
            raise PolicyError(f"coldstart file {path}: {e}") from None
    return costs


def main(args: argparse.Namespace) -> int:
    costs = load_costs(args.costs, args.coldstart)
    if args.model_gb is not None and not args.model_gb > 0:
        raise PolicyError(f"--model-gb must be positive, got {args.model_gb}")
    size_bytes = int(args.model_gb * 1e9) if args.model_gb else 0
    capacity = Capacity.parse(args.capacity)
    service = Service(prefill_tps=args.prefill_tps, decode_tps=args.decode_tps, fixed_s=args.service_s)
    if min(service.prefill_tps, service.decode_tps) <= 0 or service.fixed_s < 0:
        raise PolicyError("--prefill-tps and --decode-tps must be positive, --service-s not negative")
    specs = args.policy or list(DEFAULT_POLICIES)
    policies = [make(spec, costs) for spec in specs]  # fail on a bad spec before any work

    raw, trace = derive_workload(args)
    print("\n".join(describe_workload(raw, trace)))
    for line in costs.describe(size_bytes):
        print(line if line.startswith("  ") else f"costs: {line}")
    print(f"capacity: {capacity.describe()}; {service.describe()}")
    print()

    results = []
    for policy in policies:
        r = replay(policy, trace, costs, capacity=capacity, service=service, size_bytes=size_bytes)
        r["workload"] = {"trace": raw.source, "format": raw.format, "derivation": list(trace.derivation),
                         "models": len(trace.model_names), "requests": len(trace), "hours": r["hours"],
                         "capacity": capacity.describe(), "seed": args.seed}
        results.append(r)

    print(table(results))
    print()
    a = results[0]
    print(f"always-warm reference: ${a['always_warm_cost_usd']:.2f} ({a['models']} models x {a['hours']:.2f} h "
          f"x ${costs.device_usd_per_hour:g}/h x share {costs.device_share:g}); total $ counts device, "
          "host RAM and disk, not the latency")
    for r in results:
        print(f"replay {r['policy']}: {r['requests']:,} requests in {r['replay_s']:.2f} s "
              f"= {r['requests_per_min'] / 1e6:.2f} M requests/min")
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot:
        title = (f"{raw.source}: {len(trace.model_names)} models, {len(trace):,} requests, "
                 f"{trace.duration_s / 3600:.1f} h")
        plot(args.plot, results, title)
        print(f"wrote {args.plot}")
    return 0
