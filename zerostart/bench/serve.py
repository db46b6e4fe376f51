"""``zerostart bench serve``: what the gateway costs when hot, and what a cold start costs.

Starts a real gateway (``zerostart serve``) on loopback with one model (the demo model unless
``--model`` is given), then measures in the same run:

1. **Cold starts**, end to end: the model at zero, one request, the time to its response as the
   client sees it, and the gateway's phase timeline of that start (spawn, import, device init,
   read, prepare, warm-up, first token). Between repeats the model is sent back to zero with
   ``keep_alive: 0``.
2. **Hot overhead**: the same requests sent alternately through the gateway and straight to the
   worker's own socket; the added latency is the difference of the two distributions' p50 and
   p99 (non-streamed: the whole response; streamed: the first token).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import httpx
import yaml

import zerostart
from zerostart.serve import DEMO_NAME, ensure_demo_model
from zerostart.telemetry import PHASES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="checkpoint to serve (default: the built-in demo model)")
    parser.add_argument("--requests", type=int, default=300, help="hot requests per path (default: 300)")
    parser.add_argument("--cold-starts", type=int, default=3, help="cold starts to time (default: 3)")
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens per hot request (default: 1)")
    parser.add_argument("--device", default="cpu", help="device of the model (default: cpu)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def main(args: argparse.Namespace) -> int:
    if args.requests < 10 or args.cold_starts < 1:
        raise BenchError("--requests must be at least 10 and --cold-starts at least 1")
    # a SIGTERM unwinds like ^C: the gateway under test is stopped and the temp files removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.model:
        path, name = os.path.abspath(args.model), None
    else:
        path, name = ensure_demo_model(), DEMO_NAME
    with tempfile.TemporaryDirectory(prefix="zerostart-bench-") as tmp:
        # images off: every measured cold start loads the checkpoint (`zerostart coldstart`
        # measures the other rungs)
        model = {"path": path, "device": args.device, "idle_timeout": -1, "images": "off"}
        if name:
            model["name"] = name
        with Gateway({"models": [model]}, tmp) as gw:
            name = gw.http.get("/v1/models").json()["data"][0]["id"]
            cold = _cold_starts(gw, name, args.cold_starts)
            hot = _hot_overhead(gw, name, args.requests, args.max_tokens)
    result = {"model": name, "path": path, "device": args.device, "machine": machine(), "cold_start": cold,
              "hot": hot}
    print(_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


class BenchError(RuntimeError):
    """The benchmark could not run as asked."""


# -- the gateway under test --------------------------------------------------------------------

class Gateway:
    """A ``zerostart serve`` process under test (bench cluster runs one too)."""

    def __init__(self, config: dict[str, Any], tmp: str) -> None:
        cfg_path = os.path.join(tmp, "config.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(config, f)
        root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "zerostart", "serve", "--config", cfg_path, "--port", "0", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        assert self.proc.stderr is not None
        url = None
        for line in self.proc.stderr:
            self.log.append(line)
            if "serving on " in line:
                url = line.split("serving on ", 1)[1].split("/v1", 1)[0]
                break
        if url is None:
            self.proc.wait()
            raise BenchError("the gateway did not start:\n" + "".join(self.log[-20:]))
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = url
        # Nagle off, as on the worker's socket: else a request's body waits for the ACK of its headers
        nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.http = httpx.Client(transport=nodelay, base_url=url, timeout=600)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def model(self, name: str) -> dict[str, Any]:
        return next(m for m in self.http.get("/zerostart/status").json()["models"] if m["name"] == name)

    def wait_state(self, name: str, state: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.model(name)["state"] != state:
            if time.monotonic() > deadline:
                raise BenchError(f"model {name} did not reach state {state} within {timeout:g} s")
            time.sleep(0.02)

    def __enter__(self) -> "Gateway":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# -- measurements ------------------------------------------------------------------------------

def _cold_starts(gw: Gateway, name: str, n: int) -> dict[str, Any]:
    runs = []
    for i in range(n):
        gw.wait_state(name, "zero")
        t0 = time.perf_counter()
        r = gw.http.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 1, "keep_alive": 0})
        wall = time.perf_counter() - t0
        r.raise_for_status()
        status = gw.model(name)
        phases = {p["name"]: p["seconds"] for p in status["last_cold_start"]["phases"]}
        runs.append({"end_to_end_s": wall, "header_ms": float(r.headers["x-zerostart-cold-start-ms"]),
                     "ready_s": status["last_cold_start"]["ready_s"], "phases_s": phases})
        print(f"cold start {i + 1}/{n}: {wall:.3f} s", file=sys.stderr)
    names = [p for p in PHASES if any(p in r["phases_s"] for r in runs)]
    return {
        "runs": runs,
        "median_end_to_end_s": statistics.median(r["end_to_end_s"] for r in runs),
        "median_ready_s": statistics.median(r["ready_s"] for r in runs),
        "median_phases_s": {p: statistics.median(r["phases_s"].get(p, 0.0) for r in runs) for p in names},
    }


def _hot_overhead(gw: Gateway, name: str, n: int, max_tokens: int) -> dict[str, Any]:
    gw.http.post("/v1/completions", json={"model": name, "prompt": "warm", "max_tokens": 1}).raise_for_status()
    worker = gw.model(name)["workers"][0]["address"]
    if worker.startswith("unix:"):
        direct = httpx.Client(transport=httpx.HTTPTransport(uds=worker[len("unix:"):]), base_url="http://worker",
                              timeout=600)
    else:
        direct = httpx.Client(base_url=worker, timeout=600)
    via = gw.http
    body = {"model": name, "prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0}
    stream_body = {**body, "max_tokens": max(2, max_tokens), "stream": True}
    samples: dict[str, list[float]] = {"direct": [], "gateway": [], "direct_ttft": [], "gateway_ttft": []}
    with direct:
        for client in (direct, via):  # warm both connections
            client.post("/v1/completions", json=body).raise_for_status()
        for i in range(n):
            # alternate which goes first, so drift and caches favor neither
            order = ((direct, "direct"), (via, "gateway")) if i % 2 == 0 else ((via, "gateway"), (direct, "direct"))
            for client, key in order:
                t0 = time.perf_counter()
                client.post("/v1/completions", json=body).raise_for_status()
                samples[key].append(time.perf_counter() - t0)
            for client, key in order:
                samples[f"{key}_ttft"].append(_ttft(client, stream_body))
            if (i + 1) % 50 == 0 or i + 1 == n:
                print(f"hot requests: {i + 1}/{n} per path", file=sys.stderr)
    out: dict[str, Any] = {"requests": n, "max_tokens": max_tokens}
    for kind, (d, g) in {"unary": ("direct", "gateway"), "stream_ttft": ("direct_ttft", "gateway_ttft")}.items():
        dp, gp = percentiles(samples[d]), percentiles(samples[g])
        paired = statistics.median(b - a for a, b in zip(samples[d], samples[g]))
        out[kind] = {"direct": dp, "gateway": gp,
                     "added_ms": {q: round((gp[q] - dp[q]) * 1000, 3) for q in ("p50", "p99")},
                     "added_paired_median_ms": round(paired * 1000, 3),
                     "ratio_p50": round(gp["p50"] / dp["p50"], 3)}
    return out


def _ttft(client: httpx.Client, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: ") and '"text":""' not in line:
                first = time.perf_counter() - t0
    if first is None:
        raise BenchError("a streamed request produced no text")
    return first


def percentiles(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "mean": statistics.fmean(s)}


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "loadavg_1m": load[0] if load else None, "python": sys.version.split()[0]}


def _report(r: dict[str, Any]) -> str:
    cold, hot = r["cold_start"], r["hot"]
    lines = [f"zerostart bench serve: model {r['model']} on {r['device']} "
             f"({r['machine']['cpus']} CPUs, load {r['machine']['loadavg_1m']:.1f})", "",
             f"cold start, end to end (median of {len(cold['runs'])}): {cold['median_end_to_end_s']:.3f} s "
             f"(spawn to ready {cold['median_ready_s']:.3f} s)",
             f"{'phase':<12} {'median s':>9} {'share':>6}"]
    total = sum(cold["median_phases_s"].values()) or 1.0
    for p, s in cold["median_phases_s"].items():
        lines.append(f"{p:<12} {s:9.3f} {s / total:6.1%}")
    lines += ["", f"hot: {hot['requests']} requests per path, alternating, one at a time",
              f"{'':<22} {'direct p50':>10} {'gateway p50':>11} {'added p50':>9} {'added p99':>9} "
              f"{'paired':>8} {'ratio':>6}"]
    for kind, label in (("unary", f"completion ({hot['max_tokens']} tok)"), ("stream_ttft", "stream, first token")):
        k = hot[kind]
        lines.append(f"{label:<22} {k['direct']['p50'] * 1000:8.2f}ms {k['gateway']['p50'] * 1000:9.2f}ms "
                     f"{k['added_ms']['p50']:7.2f}ms {k['added_ms']['p99']:7.2f}ms "
                     f"{k['added_paired_median_ms']:6.2f}ms {k['ratio_p50']:6.2f}")
    lines.append("(added: gateway minus direct at that percentile; paired: median of per-pair differences)")
    return "\n".join(lines)
