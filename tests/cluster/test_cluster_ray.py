"""zerostart on a real local Ray cluster (three loopback nodes plus a head, CPU, fake GPUs where
placement is tested), driven through the OpenAI client and plain HTTP.

Run with ``make test-ray`` (in .venvs/ray). Each test deploys its own application.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")]

pytest.importorskip("ray")

from tests.cluster._ray import GPU_LABELS, WORKER_LABELS, LocalCluster, ray, wait_for  # noqa: E402


def _models(tiny_models: tuple[str, str], **keys: object) -> list[dict[str, object]]:
    a, b = tiny_models
    return [{"path": a, "name": "a", **keys}, {"path": b, "name": "b", **keys}]


def _complete(url: str, model: str, **body: object) -> httpx.Response:
    payload = {"model": model, "prompt": "hello", "max_tokens": 2, **body}
    return httpx.post(url + "/completions", json=payload, timeout=120)


def _cold_starts(base: str, model: str) -> float:
    """zerostart_cold_starts_total for a model, summed over every replica of the cluster."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "zerostart_cold_starts_total" and s.labels.get("model") == model:
                total += s.value
    return total


def test_100_concurrent_requests_at_zero_are_all_answered_by_one_replica_start(ray_cluster: LocalCluster,
                                                                               tiny_models) -> None:
    url = ray_cluster.deploy(_models(tiny_models), [{"name": "pool", "models": ["a", "b"], "max_replicas": 2,
                                                     "target_ongoing_requests": 128, "max_ongoing_requests": 128}])
    assert ray_cluster.running("pool") == 0  # deployed at zero

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=128)) as client:
            return await asyncio.gather(*[client.post(url + "/completions", json={
                "model": "a", "prompt": "hi", "max_tokens": 2}) for _ in range(100)])

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 100
    assert all(r.json()["choices"][0]["finish_reason"] for r in responses)
    assert len({r.headers["x-zerostart-replica"] for r in responses}) == 1
    # one replica started, and in it one worker start (a cold start from source) for all 100
    assert ray_cluster.replica_states("pool").get("RUNNING") == 1
    wait_for(lambda: _cold_starts(ray_cluster.url, "a") >= 1, 30, "the replica's report")
    assert _cold_starts(ray_cluster.url, "a") == 1
    waited = sorted(int(r.headers["x-zerostart-cluster-wait-ms"]) for r in responses)
    assert waited[0] > 0  # each of them was held while the pool came up from zero


def test_holding_is_bounded_past_max_queued_requests_with_429_and_retry_after(ray_cluster: LocalCluster,
                                                                               tiny_models) -> None:
    url = ray_cluster.deploy(_models(tiny_models), [{"name": "pool", "models": ["a", "b"], "max_ongoing_requests": 1,
                                                     "max_queued_requests": 2}])

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180) as client:
            return await asyncio.gather(*[client.post(url + "/completions", json={
                "model": "a", "prompt": "hi", "max_tokens": 2}) for _ in range(12)])

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes  # each request answered: served, or refused at once
    assert 2 <= codes.count(200) < 12  # Ray held two while the pool started at zero; the rest were refused
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full" and "max_queued_requests" in r.json()["error"]["message"]


def test_two_models_share_a_replica_with_a_park_and_a_wake_between_them(ray_cluster: LocalCluster,
                                                                         tiny_models) -> None:
    url = ray_cluster.deploy(_models(tiny_models, park_after=1, idle_timeout=120),
                             [{"name": "pool", "models": ["a", "b"]}])
    first = _complete(url, "a")
    assert first.status_code == 200
    replica = first.headers["x-zerostart-replica"]

    def rung_of(model: str) -> str:
        entries = ray_cluster.status()["models"].get(model, [])
        return entries[0]["state"] if entries else "none"

    wait_for(lambda: rung_of("a") == "parked", 30, "model a to park inside its replica")
    second = _complete(url, "b")  # the other model, on the same replica, while a rests parked
    assert second.status_code == 200 and second.headers["x-zerostart-replica"] == replica
    assert rung_of("a") == "parked"
    woken = _complete(url, "a")
    assert woken.status_code == 200 and woken.headers["x-zerostart-replica"] == replica
    # the cluster's status follows each replica's reports (sent as each request ends)
    status = wait_for(lambda: (s := ray_cluster.status())["models"]["a"][0]["state"] == "hot" and s, 30,
                      "the replica's report of a, hot again")
    a = status["models"]["a"][0]
    assert a["replica"] == replica and a["last_cold_start"]["rung"] == "parked"  # a wake, not a new start
    assert [p["name"] for p in a["last_cold_start"]["phases"]][0] == "wake"
    assert status["models"]["b"][0]["replica"] == replica
    assert len(status["replicas"]) == 1
    # the ingress answers what needs no replica itself, in OpenAI's shapes
    base = ray_cluster.url
    assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["a", "b"]
    unknown = _complete(url, "nope")
    assert unknown.status_code == 404 and "served models: a, b" in unknown.json()["error"]["message"]
    bad = httpx.post(url + "/completions", content=b"{", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_requests_stick_to_the_replica_that_holds_their_model(ray_cluster: LocalCluster, tiny_models) -> None:
    url = ray_cluster.deploy(_models(tiny_models), [{"name": "pool", "models": ["a", "b"], "min_replicas": 2,
                                                     "max_replicas": 2}])
    wait_for(lambda: ray_cluster.running("pool") == 2, 120, "two replicas of the pool")
    wait_for(lambda: len(ray_cluster.status()["replicas"]) == 2, 30, "both replicas in the directory")
    holders = {_complete(url, "a").headers["x-zerostart-replica"] for _ in range(8)}
    assert len(holders) == 1
    holder = holders.pop()
    hot = wait_for(lambda: [e for e in ray_cluster.status()["models"]["a"] if e["state"] == "hot"], 30,
                   "the reports of a hot")
    assert [e["replica"] for e in hot] == [holder]  # one worker of a, where every request went
    assert _cold_starts(ray_cluster.url, "a") == 1


def test_an_idle_pool_goes_to_zero_when_the_zerostart_policy_says_so(ray_cluster: LocalCluster,
                                                                      tiny_models) -> None:
    ttl = 4.0
    url = ray_cluster.deploy(_models(tiny_models), [{"name": "pool", "models": ["a", "b"],
                                                     "keep_alive_policy": f"ttl:{ttl:g}"}],
                             server={"stream_keepalive": 0.2})
    assert _complete(url, "a").status_code == 200
    done = time.monotonic()
    assert ray_cluster.running("pool") == 1
    wait_for(lambda: ray_cluster.running("pool") == 0, 60, "the pool to scale to zero")
    gone = time.monotonic() - done
    # kept through the policy's idle timeout, released soon after (Ray's delays are 0; its load
    # signal lags by look_back + metrics_interval, and stopping a replica takes a moment)
    assert ttl <= gone <= ttl + 15, gone
    # and back from zero on the next request, a streamed one: held with SSE comments, then its tokens
    with httpx.stream("POST", url + "/completions", json={"model": "a", "prompt": "hi", "max_tokens": 3,
                                                          "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-zerostart-cold-start-ms"] == "pending"
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[0].startswith(": waiting for a replica of model a")
    data = [ln for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and json.loads(data[0][6:])["object"] == "text_completion"


def test_a_replica_killed_mid_stream_ends_the_stream_cleanly_and_the_pool_recovers(ray_cluster: LocalCluster,
                                                                                   tiny_models) -> None:
    import openai

    url = ray_cluster.deploy(_models(tiny_models), [{"name": "pool", "models": ["a", "b"]}])
    assert _complete(url, "a").status_code == 200
    status = wait_for(lambda: (s := ray_cluster.status())["models"].get("a") and s["models"]["a"][0]["workers"] and s,
                      30, "the report of a's worker")
    replica = status["replicas"][0]["replica"]
    worker_pid = status["models"]["a"][0]["workers"][0]["pid"]
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    stream = client.completions.create(model="a", prompt="hello", max_tokens=1000, stream=True,
                                       extra_body={"ignore_eos": True})
    got = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            got.append(chunk.choices[0].text)
            if len(got) == 3:
                name = next(n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                            if n["name"].startswith("SERVE_REPLICA::") and n["name"].endswith(replica))
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    assert 3 <= len(got) < 1000
    assert "died during this request" in str(err.value) and "retry" in str(err.value)
    # the killed replica's model worker went with it (its stdin closed)
    wait_for(lambda: not _alive(worker_pid), 30, f"worker {worker_pid} to exit")
    again = _complete(url, "a")  # Ray replaces the replica; the request is served
    assert again.status_code == 200 and again.headers["x-zerostart-replica"] != replica


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_placement_gpus_tensor_parallel_and_node_labels(ray_cluster: LocalCluster, tiny_models) -> None:
    url = ray_cluster.deploy(_models(tiny_models), [{"name": "pool", "models": ["a", "b"], "placement": {
        "num_cpus": 1, "num_gpus": 1, "tensor_parallel": 2, "node_labels": GPU_LABELS}}])
    response = _complete(url, "a")
    assert response.status_code == 200
    rep = wait_for(lambda: ray_cluster.status()["replicas"], 30, "the replica's report")[0]
    assert rep["node"] == ray_cluster.gpu_node.node_id  # the only node with that label and 2 GPUs
    assert sorted(rep["cuda_visible_devices"].split(",")) == ["0", "1"]  # both ranks' GPUs, for its workers


def test_a_removed_node_is_replaced_by_the_other_for_new_requests(ray_cluster: LocalCluster, tiny_models) -> None:
    url = ray_cluster.deploy(_models(tiny_models), [{"name": "pool", "models": ["a", "b"], "min_replicas": 1,
                                                     "placement": {"node_labels": WORKER_LABELS}}])
    first = _complete(url, "a")
    assert first.status_code == 200
    node = wait_for(lambda: ray_cluster.status()["replicas"], 30, "the replica's report")[0]["node"]
    assert node in {n.node_id for n in ray_cluster.workers + [ray_cluster.gpu_node]}
    ray_cluster.cluster.remove_node(ray_cluster.node_of(node))
    served = wait_for(lambda: _served_elsewhere(url, node, ray_cluster), 180, "a request served on another node")
    assert served.status_code == 200
    assert json.loads(served.text)["choices"][0]["text"] is not None


def _served_elsewhere(url: str, node: str, c: LocalCluster) -> httpx.Response | None:
    try:
        r = _complete(url, "a")
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return r if r.headers["x-zerostart-node"] != node[:12] else None


def test_the_ingress_is_the_gateways_edge_keys_tenants_and_cards(ray_cluster: LocalCluster, tiny_models) -> None:
    """The same keys, tenants and admin routes as one machine's gateway, the same model cards
    and 404s; /v1/responses is not served on a cluster (its store lives in one gateway)."""
    ray_cluster.deploy(_models(tiny_models), [{"name": "pool", "models": ["a", "b"]}],
                       server={"api_keys": ["k-tenant"], "tenants": [{"name": "ops", "keys": ["k-ops"], "admin": True}]})
    base = ray_cluster.url

    def get(path: str, key: str | None = None) -> httpx.Response:
        return httpx.get(base + path, timeout=30, headers={"authorization": f"Bearer {key}"} if key else {})

    assert get("/v1/models").status_code == 401 and get("/health").status_code == 200
    cards = get("/v1/models", "k-tenant").json()["data"]
    assert [(c["id"], c["pool"], c["root"], c["owned_by"]) for c in cards] == [
        ("a", "pool", tiny_models[0], "zerostart"), ("b", "pool", tiny_models[1], "zerostart")]
    for path in ("/zerostart/status", "/metrics"):
        refused = get(path, "k-tenant")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only", refused.text
        assert get(path, "k-ops").status_code == 200
    assert get("/v1/nope", "k-tenant").json()["error"]["code"] == "route_not_found"
    responses = httpx.post(base + "/v1/responses", json={"model": "a", "input": "hi"}, timeout=30,
                           headers={"authorization": "Bearer k-tenant"})
    assert responses.status_code == 501 and "Ray cluster" in responses.json()["error"]["message"]
