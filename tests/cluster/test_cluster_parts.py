"""The parts of zerostart.cluster that need no Ray cluster: the autoscaling adapter over the real
policy objects, the deployment options a config becomes, the metrics merge, the in-process ASGI
call, the command line, and the package's import boundaries."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import zerostart.cluster
from zerostart.cluster import ReplicaPolicy, engine_options, merge_metrics, pools, replica_policy
from zerostart.cluster._asgi import Head, call
from zerostart.serve import ConfigError, load_config


def _config(**cluster: object) -> object:
    return load_config(data={"models": [{"path": "/m/a", "name": "a", "idle_timeout": 600},
                                        {"path": "/m/b", "name": "b", "idle_timeout": 60},
                                        {"path": "/m/c", "name": "c"}],
                             "cluster": cluster})


# -- the autoscaling adapter ------------------------------------------------------------------


def _ctx(load: float, replicas: int, now: float) -> SimpleNamespace:
    return SimpleNamespace(total_num_requests=load, current_num_replicas=replicas, current_time=now)


def test_ttl_policy_keeps_the_replica_through_its_timeout_then_releases_it() -> None:
    p = ReplicaPolicy("ttl:30", "pool", target_ongoing_requests=4)
    assert p(_ctx(0, 0, 100.0))[0] == 0  # never active: nothing to keep (no pre-warm at deploy)
    assert p(_ctx(3, 0, 101.0))[0] == 1  # a request at zero climbs
    assert p(_ctx(9, 1, 102.0))[0] == 3  # busy past one replica: ceil(9 / 4)
    want, state = p(_ctx(0, 3, 110.0))  # idle now: one replica holds the pool's models
    assert want == 1 and state["zerostart_rung"] == "hot"
    assert p(_ctx(0, 1, 139.9))[0] == 1
    want, state = p(_ctx(0, 1, 140.0))  # 30 s after the pool went idle
    assert want == 0 and state["zerostart_rung"] in ("image", "zero") and "timeout" in state["zerostart_reason"]


def test_a_policy_that_parks_keeps_the_replica_so_its_models_park_inside() -> None:
    p = ReplicaPolicy("ttl:5,down=parked", "pool", target_ongoing_requests=1)
    p(_ctx(1, 1, 0.0))
    p(_ctx(0, 1, 1.0))  # idle from here
    want, state = p(_ctx(0, 1, 100.0))
    assert want == 1 and state["zerostart_rung"] == "parked"


def test_always_keeps_one_replica_and_the_same_policy_objects_as_the_fleet() -> None:
    from zerostart.policy import FixedTTL, make

    p = ReplicaPolicy("always", "pool", target_ongoing_requests=1)
    assert p(_ctx(0, 0, 0.0))[0] == 1
    assert isinstance(ReplicaPolicy("ttl:3", "x", 1).policy, FixedTTL)
    assert type(ReplicaPolicy("ladder", "x", 1).policy) is type(make("ladder"))


def test_the_ladder_policy_sees_one_arrival_and_one_completion_per_busy_period() -> None:
    seen: list[tuple[str, float]] = []
    p = ReplicaPolicy("ttl:10", "pool", target_ongoing_requests=1)
    p.policy.observe_arrival = lambda m, t: seen.append(("arrive", t))
    p.policy.observe_completion = lambda m, t: seen.append(("complete", t))
    for t, load in [(1, 0), (2, 2), (3, 5), (4, 1), (5, 0), (6, 0), (7, 1), (8, 0)]:
        p(_ctx(load, 1, float(t)))
    assert seen == [("arrive", 2.0), ("complete", 5.0), ("arrive", 7.0), ("complete", 8.0)]


def test_a_bad_policy_spec_is_named() -> None:
    from zerostart.policy import PolicyError

    with pytest.raises(PolicyError, match="unknown policy 'tll'"):
        ReplicaPolicy("tll:5", "pool", 1)


# -- config -> deployments --------------------------------------------------------------------


def test_models_in_no_pool_share_the_default_pool() -> None:
    cfg = _config(pools=[{"name": "big", "models": ["a"]}])
    assert [(p.name, p.models) for p in pools(cfg)] == [("big", ["a"]), ("default", ["b", "c"])]


def test_the_replica_policy_defaults_to_the_longest_idle_timeout_of_the_pool() -> None:
    cfg = _config(pools=[{"name": "p", "models": ["a", "b"]}, {"name": "q", "models": ["c"],
                                                              "keep_alive_policy": "ladder"}])
    p, q = pools(cfg)
    assert replica_policy(p, cfg) == "ttl:600"
    assert replica_policy(q, cfg) == "ladder"
    forever = load_config(data={"models": [{"path": "/m/a", "idle_timeout": -1}]})
    assert replica_policy(pools(forever)[0], forever) == "always"


def test_engine_options_put_rays_delays_out_of_the_way_and_place_from_config() -> None:
    cfg = _config(cache_dir="/nvme/zerostart", pools=[{
        "name": "gpu", "models": ["a"], "max_replicas": 4, "max_queued_requests": 7,
        "placement": {"num_cpus": 2, "num_gpus": 1, "tensor_parallel": 2, "node_labels": {"nvme": "yes"},
                      "max_replicas_per_node": 1, "resources": {"a100": 1}}}])
    opts = engine_options(pools(cfg)[0], cfg)
    auto = opts["autoscaling_config"]
    assert (auto["upscale_delay_s"], auto["downscale_delay_s"], auto["downscale_to_zero_delay_s"]) == (0, 0, 0)
    assert auto["min_replicas"] == 0 and auto["max_replicas"] == 4
    assert auto["policy"]["policy_function"] == "zerostart.cluster._autoscale:ReplicaPolicy"
    assert auto["policy"]["policy_kwargs"] == {"policy": "ttl:600", "pool": "gpu", "target_ongoing_requests": 16.0}
    actor = opts["ray_actor_options"]
    assert actor == {"num_cpus": 2.0, "num_gpus": 2.0, "resources": {"a100": 1.0},
                     "label_selector": {"nvme": "yes"},
                     "runtime_env": {"env_vars": {"ZEROSTART_CACHE_DIR": "/nvme/zerostart"}}}
    assert opts["max_replicas_per_node"] == 1 and opts["max_queued_requests"] == 7


def test_config_errors_name_the_pool_and_the_model() -> None:
    with pytest.raises(ConfigError, match=r"cluster.pools\[0\] \(p\): no model named 'zz'"):
        _config(pools=[{"name": "p", "models": ["zz"]}])
    with pytest.raises(ConfigError, match="model 'a' is in two pools"):
        _config(pools=[{"name": "p", "models": ["a"]}, {"name": "q", "models": ["a"]}])
    with pytest.raises(ConfigError, match="tensor_parallel is 2 but num_gpus is 0"):
        _config(pools=[{"name": "p", "models": ["a"], "placement": {"tensor_parallel": 2}}])
    with pytest.raises(ConfigError, match=r"cluster.pools\[0\].placement.num_gpu: unknown key"):
        _config(pools=[{"name": "p", "models": ["a"], "placement": {"num_gpu": 1}}])


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_of_every_replica_merge_into_one_valid_exposition() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    texts = []
    for n in (1, 2):
        reg = CollectorRegistry()
        Counter("zerostart_requests", "Requests", ["model"], registry=reg).labels("a").inc(n)
        Gauge("zerostart_queue_length", "Queued", ["model"], registry=reg).labels("a").set(n * 10)
        texts.append(generate_latest(reg).decode())
    merged = merge_metrics([(texts[0], {"replica": "r1", "node": "n1"}), (texts[1], {"replica": "r2", "node": "n2"})])
    assert merged.count("# TYPE zerostart_requests_total counter") == 1
    samples = {(s.name, s.labels["replica"]): s.value
               for fam in text_string_to_metric_families(merged) for s in fam.samples}
    assert samples == {("zerostart_requests_total", "r1"): 1.0, ("zerostart_requests_total", "r2"): 2.0,
                       ("zerostart_queue_length", "r1"): 10.0, ("zerostart_queue_length", "r2"): 20.0}


# -- the in-process ASGI call -----------------------------------------------------------------


async def _stream(request: Request) -> StreamingResponse:
    n = int((await request.json())["n"])

    async def body():
        for i in range(n):
            yield f"data: {i}\n\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"x-n": str(n)})


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"auth": request.headers.get("authorization"), "q": request.url.query}, status_code=201)


_APP = Starlette(routes=[Route("/s", _stream, methods=["POST"]), Route("/e", _echo, methods=["POST"])])


def test_an_asgi_call_yields_the_head_then_each_chunk_as_written() -> None:
    async def run() -> list[object]:
        return [p async for p in call("POST", "/s", b'{"n": 3}', [("content-type", "application/json")], app=_APP)]

    parts = asyncio.run(run())
    head = parts[0]
    assert isinstance(head, Head) and head.status == 200 and ("x-n", "3") in head.headers
    assert parts[1:] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


def test_an_asgi_call_passes_headers_and_query_and_status() -> None:
    async def run() -> list[object]:
        return [p async for p in call("POST", "/e?x=1", b"", [("Authorization", "Bearer k")], app=_APP)]

    head, body = asyncio.run(run())
    assert isinstance(head, Head) and head.status == 201
    assert body == b'{"auth":"Bearer k","q":"x=1"}'


def test_closing_an_asgi_call_early_tells_the_app_the_client_left() -> None:
    closed = asyncio.Event()

    async def endless(request: Request) -> StreamingResponse:
        async def body():
            try:
                while True:
                    yield b"x"
                    await asyncio.sleep(0.01)
            finally:
                closed.set()

        return StreamingResponse(body())

    app = Starlette(routes=[Route("/x", endless, methods=["POST"])])

    async def run() -> None:
        parts = call("POST", "/x", b"", [], app=app)
        assert isinstance(await parts.__anext__(), Head)
        assert await parts.__anext__() == b"x"
        await parts.aclose()
        await asyncio.wait_for(closed.wait(), 5)

    asyncio.run(run())


# -- the command line and the package ---------------------------------------------------------


def test_serve_takes_cluster_flags_and_stays_single_node_without_them() -> None:
    from zerostart.cli import _build_parser

    args = _build_parser(("serve",)).parse_args(["serve", "--cluster", "ray", "--address", "10.0.0.5:6379"])
    assert (args.cluster, args.address, args._module) == ("ray", "10.0.0.5:6379", "zerostart.serve._cli")
    from zerostart.serve._cli import build_config

    config, _ = build_config(_build_parser(("serve",)).parse_args(
        ["serve", "--cluster", "ray", "--address", "10.0.0.5:6379", "--model", "/m/x"]))
    assert (config.cluster.backend, config.cluster.address) == ("ray", "10.0.0.5:6379")
    args = _build_parser(("serve",)).parse_args(["serve"])
    assert args.cluster is None


def test_importing_the_package_and_its_cli_imports_neither_ray_nor_torch() -> None:
    code = ("import sys, zerostart.cluster, zerostart.serve._cli, zerostart.cluster._autoscale; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_surface() -> None:
    assert zerostart.cluster.__all__ == ["ReplicaPolicy", "app_from_args", "build", "deploy", "engine_options",
                                         "merge_metrics", "pools", "replica_policy", "serve_forever"]
