"""``zerostart bench cluster``: what Ray Serve adds to a cold start at zero and to a hot request,
next to the single-node gateway on the same model, in the same run (needs .venvs/ray).

Starts a local two-node Ray cluster on loopback (a head with the ingress, a worker node for the
engine replica) and a single-node gateway (``zerostart serve``), both serving the same model
with ready images off, so every cold start loads the checkpoint. Then:

1. **Cold starts at zero**, alternating gateway and Ray: one request, the time to its response
   as the client sees it. Through Ray the time splits into: Ray placing and starting the replica
   process (client send -> the replica's constructor), the replica's own start (its fleet), the
   fleet's cold start of the model (the same phases as on one machine), and the rest (routing,
   proxy, the autoscaler's reaction). Between repeats the gateway's model idles out
   (``keep_alive: 0``) and the Ray pool goes back to zero by its policy (``ttl:0``).
2. **Hot overhead**: 1-token completions alternating four paths: each worker's own socket, the
   gateway, and Ray's proxy -> ingress -> replica; p50 and paired differences.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import httpx

from zerostart.bench.serve import BenchError, Gateway, machine, percentiles
from zerostart.cluster import deploy
from zerostart.serve import load_config
from zerostart.serve import DEMO_NAME, ensure_demo_model
from zerostart.telemetry import PHASES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="checkpoint to serve (default: the built-in demo model)")
    parser.add_argument("--cold-starts", type=int, default=3, help="cold starts per path (default: 3)")
    parser.add_argument("--requests", type=int, default=100, help="hot requests per path (default: 100)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def main(args: argparse.Namespace) -> int:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback only; read when ray loads
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.model:
        path, name = os.path.abspath(args.model), None
    else:
        path, name = ensure_demo_model(), DEMO_NAME
    name = name or os.path.basename(path)
    model = {"path": path, "name": name, "idle_timeout": -1, "images": "off"}
    with tempfile.TemporaryDirectory(prefix="zerostart-bench-cluster-") as tmp:
        with Gateway({"models": [model]}, tmp) as gw, _RayCluster(model, tmp) as ray_app:
            cold = _cold_starts(gw, ray_app, name, args.cold_starts)
            _wait(lambda: ray_app.running() == 0, 120, "the Ray pool at zero")
            memory = ray_app.memory()  # the cluster idle: the pool at zero, the ingress and directory up
            ray_app.redeploy(keep="always")
            hot = _hot(gw, ray_app, name, args.requests)
    result = {"model": name, "path": path, "machine": machine(), "cold_start": cold, "hot": hot,
              "ray_idle_cluster": memory}
    print(_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


class _RayCluster:
    """A head node (ingress, directory, Serve's proxy) and one worker node (the engine replica)."""

    def __init__(self, model: dict[str, Any], tmp: str) -> None:
        # ray (optional): only when this benchmark runs
        import ray
        from ray.cluster_utils import Cluster

        self.model = model
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "labels": {"role": "head"}, "temp_dir": tmp})
        self.cluster.add_node(num_cpus=1)
        ray.init(address=self.cluster.address, logging_level="warning", log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.redeploy(keep="ttl:0")
        nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.http = httpx.Client(transport=nodelay, base_url=self.url, timeout=600)

    def redeploy(self, keep: str) -> None:
        # ray (optional): only when this benchmark runs
        from ray import serve

        if "zerostart" in serve.status().applications:
            serve.delete("zerostart")
        deploy(load_config(data={"server": {"port": self.port}, "models": [self.model], "cluster": {
            "ingress": {"node_labels": {"role": "head"}},
            "pools": [{"name": "pool", "models": [self.model["name"]], "keep_alive_policy": keep,
                       "placement": {"num_cpus": 1}}]}}))

    def running(self) -> int:
        # ray (optional): only when this benchmark runs
        from ray import serve

        app = serve.status().applications.get("zerostart")
        return 0 if app is None else app.deployments["pool"].replica_states.get("RUNNING", 0)

    def status(self) -> dict[str, Any]:
        return self.http.get("/zerostart/status").json()

    def memory(self) -> dict[str, Any]:
        """Resident memory of every Ray process (raylets, GCS, Serve's controller, proxy and actors)."""
        rss = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                if not any(k in cmd for k in ("raylet", "gcs_server", "ray::", "ray/_private", "default_worker")):
                    continue
                with open(f"/proc/{pid}/status") as f:
                    rss += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
            except (OSError, StopIteration):  # gone meanwhile, or a kernel thread
                continue
        return {"ray_processes_rss_bytes": rss}

    def __enter__(self) -> "_RayCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        # ray (optional): only when this benchmark runs
        import ray
        from ray import serve

        self.http.close()
        serve.shutdown()
        ray.shutdown()
        self.cluster.shutdown()


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout:g} s waiting for {what}")


def _cold_starts(gw: Gateway, rc: _RayCluster, name: str, n: int) -> dict[str, Any]:
    body = {"model": name, "prompt": "Hello", "max_tokens": 1}
    runs: dict[str, list[dict[str, Any]]] = {"gateway": [], "ray": []}
    for i in range(n):
        gw.wait_state(name, "zero")
        t0 = time.perf_counter()
        r = gw.http.post("/v1/completions", json={**body, "keep_alive": 0})
        wall = time.perf_counter() - t0
        r.raise_for_status()
        cs = gw.model(name)["last_cold_start"]
        runs["gateway"].append({"end_to_end_s": wall, "phases_s": {p["name"]: p["seconds"] for p in cs["phases"]}})

        _wait(lambda: rc.running() == 0, 120, "the Ray pool at zero")
        sent = time.time()
        t0 = time.perf_counter()
        r = rc.http.post("/v1/completions", json=body)
        wall = time.perf_counter() - t0
        r.raise_for_status()
        replica = r.headers["x-zerostart-replica"]
        status = _wait(lambda: (s := rc.status())["models"].get(name) and s["models"][name][0]["last_cold_start"]
                       and s["models"][name][0]["replica"] == replica and s, 30, "the replica's report")
        rep = next(x for x in status["replicas"] if x["replica"] == replica)
        cs = status["models"][name][0]["last_cold_start"]
        fleet_s = float(r.headers["x-zerostart-cold-start-ms"]) / 1000.0
        place = rep["started_at"] - sent
        parts = {"ray: place + start the replica process": place, "replica: start its fleet": rep["init_s"],
                 "fleet: the model's cold start": fleet_s}
        parts["rest: autoscaler, routing, proxies"] = wall - sum(parts.values())
        runs["ray"].append({"end_to_end_s": wall, "parts_s": parts,
                            "phases_s": {p["name"]: p["seconds"] for p in cs["phases"]}})
        print(f"cold start {i + 1}/{n}: gateway {runs['gateway'][-1]['end_to_end_s']:.3f} s, ray {wall:.3f} s",
              file=sys.stderr)
    out: dict[str, Any] = {"runs": runs}
    for key, rs in runs.items():
        names = [p for p in PHASES if any(p in r["phases_s"] for r in rs)]
        out[key] = {"median_end_to_end_s": statistics.median(r["end_to_end_s"] for r in rs),
                    "median_phases_s": {p: statistics.median(r["phases_s"].get(p, 0.0) for r in rs) for p in names}}
    out["ray"]["median_parts_s"] = {k: statistics.median(r["parts_s"][k] for r in runs["ray"])
                                    for k in runs["ray"][0]["parts_s"]}
    out["ray_over_gateway"] = out["ray"]["median_end_to_end_s"] / out["gateway"]["median_end_to_end_s"]
    return out


def _direct(address: str) -> httpx.Client:
    if address.startswith("unix:"):
        return httpx.Client(transport=httpx.HTTPTransport(uds=address[len("unix:"):]), base_url="http://worker",
                            timeout=600)
    return httpx.Client(base_url=address, timeout=600)


def _hot(gw: Gateway, rc: _RayCluster, name: str, n: int) -> dict[str, Any]:
    body = {"model": name, "prompt": "The quick brown fox", "max_tokens": 1, "temperature": 0}
    gw.http.post("/v1/completions", json=body).raise_for_status()
    rc.http.post("/v1/completions", json=body).raise_for_status()
    status = _wait(lambda: (s := rc.status())["models"].get(name) and s["models"][name][0]["workers"] and s, 30,
                   "the Ray replica's worker in status")
    paths = {"gateway_direct": _direct(gw.model(name)["workers"][0]["address"]), "gateway": gw.http,
             "ray_direct": _direct(status["models"][name][0]["workers"][0]["address"]), "ray": rc.http}
    samples: dict[str, list[float]] = {k: [] for k in paths}
    for client in paths.values():
        client.post("/v1/completions", json=body).raise_for_status()
    keys = list(paths)
    for i in range(n):
        for key in keys[i % 4:] + keys[: i % 4]:  # rotate who goes first
            t0 = time.perf_counter()
            paths[key].post("/v1/completions", json=body).raise_for_status()
            samples[key].append(time.perf_counter() - t0)
    for key in ("gateway_direct", "ray_direct"):
        paths[key].close()
    out: dict[str, Any] = {"requests": n, "p50_ms": {k: round(percentiles(v)["p50"] * 1000, 3)
                                                     for k, v in samples.items()}}
    out["added_paired_median_ms"] = {
        "gateway": round(statistics.median(b - a for a, b in zip(samples["gateway_direct"], samples["gateway"]))
                         * 1000, 3),
        "ray": round(statistics.median(b - a for a, b in zip(samples["ray_direct"], samples["ray"])) * 1000, 3)}
    return out


def _report(r: dict[str, Any]) -> str:
    cold, hot = r["cold_start"], r["hot"]
    g, y = cold["gateway"], cold["ray"]
    lines = [f"zerostart bench cluster: model {r['model']} on CPU ({r['machine']['cpus']} CPUs, "
             f"load {r['machine']['loadavg_1m']:.1f})", "",
             f"cold start at zero, end to end (median of {len(cold['runs']['ray'])}): gateway "
             f"{g['median_end_to_end_s']:.3f} s, Ray {y['median_end_to_end_s']:.3f} s "
             f"({cold['ray_over_gateway']:.2f}x)", "",
             f"{'through Ray':<42} {'median s':>9}"]
    for k, s in y["median_parts_s"].items():
        lines.append(f"{k:<42} {s:9.3f}")
    lines += ["", f"{'model phase':<12} {'gateway s':>10} {'in Ray s':>9}"]
    for p in g["median_phases_s"]:
        lines.append(f"{p:<12} {g['median_phases_s'][p]:10.3f} {y['median_phases_s'].get(p, 0.0):9.3f}")
    p50 = hot["p50_ms"]
    lines += ["", f"hot 1-token completion, p50 of {hot['requests']} per path (ms):",
              f"  worker direct {p50['gateway_direct']:.2f} | gateway {p50['gateway']:.2f} "
              f"(adds {hot['added_paired_median_ms']['gateway']:.2f} paired)",
              f"  worker direct {p50['ray_direct']:.2f} | Ray proxy->ingress->replica {p50['ray']:.2f} "
              f"(adds {hot['added_paired_median_ms']['ray']:.2f} paired)",
              f"idle Ray cluster (2 nodes, ingress, directory): "
              f"{r['ray_idle_cluster']['ray_processes_rss_bytes'] / 2**30:.2f} GiB resident"]
    return "\n".join(lines)
