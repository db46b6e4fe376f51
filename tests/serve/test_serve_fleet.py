"""The fleet's floors and budgets, end to end: min_replicas, pre-warm windows, keep-alive
policies, and models sharing a device memory budget."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from zerostart.policy import Candidate, choose_victim

from tests.serve._helpers import Gateway


@pytest.fixture(scope="module")
def floors(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    config = {"models": [
        {"path": tiny_model, "name": "warm", "min_replicas": 1, "idle_timeout": 0.3},
        {"path": tiny_model, "name": "window", "idle_timeout": 0.3,
         "prewarm": [{"cron": "* * * * *", "duration": "1h"}]},  # a window that is always open
        {"path": tiny_model, "name": "always", "keep_alive_policy": "always"},
        {"path": tiny_model, "name": "ttl", "keep_alive_policy": "ttl:1", "idle_timeout": 300},
        {"path": tiny_model, "name": "plain", "idle_timeout": 0.3},
        {"path": tiny_model, "name": "wide", "max_replicas": 2, "max_concurrency": 1, "idle_timeout": 0.5},
    ]}
    g = Gateway(config, str(tmp_path_factory.mktemp("floors")))
    yield g
    g.stop()


def test_floors_keep_models_hot_without_traffic(floors: Gateway) -> None:
    kept = ("warm", "window", "always")
    floors.wait_for("the kept models to be hot", lambda: all(floors.model(n)["state"] == "hot" for n in kept),
                    timeout=30)
    time.sleep(0.8)  # well past their 0.3 s idle timeouts
    for name in kept:
        m = floors.model(name)
        assert m["state"] == "hot" and m["replicas"] == 1, m
        assert floors.cold_starts(name) == 1
        assert floors.cold_starts(name, ahead=True) == 1  # nobody waited for it: counted apart
    assert floors.model("plain")["state"] == "zero"  # nothing asked for it
    assert floors.model("ttl")["state"] == "zero"  # ttl has no history: it does not pre-warm

    # a request is served hot, and the floor survives its idle timeout
    raw = floors.openai().completions.with_raw_response.create(model="warm", prompt="x", max_tokens=1)
    assert raw.headers["x-zerostart-cold-start-ms"] == "0"
    time.sleep(0.6)
    assert floors.model("warm")["state"] == "hot"


def test_keep_alive_policy_replaces_the_idle_timeout(floors: Gateway) -> None:
    client = floors.openai()
    # an explicit keep_alive in a request holds the model against the policy until it runs out ...
    client.completions.create(model="ttl", prompt="x", max_tokens=1, extra_body={"keep_alive": "4s"})
    time.sleep(1.6)
    assert floors.model("ttl")["state"] == "hot"  # ttl:1 alone would have let it go
    # ... and then the policy (ttl:1) decides, not the 300 s idle_timeout of this request
    client.completions.create(model="ttl", prompt="x", max_tokens=1)
    t0 = time.monotonic()
    floors.wait_for("ttl:1 to scale to zero", lambda: floors.model("ttl")["state"] == "zero", timeout=12)
    assert 1.5 <= time.monotonic() - t0 < 10
    assert floors.cold_starts("ttl") == 1
    assert floors.cold_starts("ttl", ahead=True) == 0  # the first request waited for it


def test_a_second_replica_starts_when_the_first_is_full(floors: Gateway) -> None:
    client = floors.openai()
    long = dict(model="wide", prompt="go", max_tokens=900, stream=True, extra_body={"ignore_eos": True})
    first = client.completions.create(**long)
    next(iter(first))  # replica 1 is hot and full (max_concurrency 1) ...
    pid = floors.model("wide")["workers"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # ... and stays full, however fast this machine generates
    try:
        second = client.completions.create(**long)
        next(iter(second))  # served by a second replica, started for it
        workers = floors.model("wide")["workers"]
        assert len(workers) == 2 and all(w["state"] == "hot" and w["in_flight"] == 1 for w in workers), workers
    finally:
        os.kill(pid, signal.SIGCONT)
    first.close()  # the clients leave: the workers stop generating, the replicas go idle
    second.close()
    assert floors.cold_starts("wide") == 2
    floors.wait_for("both replicas to stop when idle", lambda: floors.model("wide")["replicas"] == 0, timeout=15)


@pytest.fixture(scope="module")
def budget(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    # two models whose estimates (600 bytes each) do not fit the device together (1000 bytes)
    config = {
        "devices": {"cpu": {"memory_budget": 1000}},
        "models": [{"path": tiny_model, "name": n, "memory_estimate": 600, "idle_timeout": 60} for n in ("m1", "m2")],
    }
    g = Gateway(config, str(tmp_path_factory.mktemp("budget")))
    yield g
    g.stop()


def test_idle_model_is_evicted_for_another(budget: Gateway) -> None:
    client = budget.openai()
    client.completions.create(model="m1", prompt="x", max_tokens=1)
    m1_pid = budget.model("m1")["workers"][0]["pid"]
    client.completions.create(model="m2", prompt="x", max_tokens=1)
    assert budget.model("m2")["state"] == "hot"
    assert budget.model("m1")["state"] == "zero" and budget.worker_pids("m1") == []
    assert m1_pid not in budget.worker_pids("m1")
    assert budget.metric("zerostart_replica_stops_total", model="m1", reason="evicted") == 1
    assert budget.metric("zerostart_memory_reserved_bytes", device="cpu") == 600
    assert budget.metric("zerostart_memory_budget_bytes", device="cpu") == 1000


def test_busy_model_is_never_evicted(budget: Gateway) -> None:
    client = budget.openai()
    assert budget.model("m2")["state"] == "hot"
    m2_pid = budget.model("m2")["workers"][0]["pid"]
    stream = client.completions.create(model="m2", prompt="go", max_tokens=900, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # m2 is serving ...
    os.kill(m2_pid, signal.SIGSTOP)  # ... and stays busy, however fast this machine generates
    done: dict[str, float] = {}

    def ask_m1() -> None:
        client.completions.create(model="m1", prompt="x", max_tokens=1)
        done["m1"] = time.monotonic()

    t = threading.Thread(target=ask_m1)
    t.start()
    try:
        budget.wait_for("m1 to wait for memory", lambda: budget.model("m1")["state"] == "starting")
        time.sleep(1.0)
        # m1 waits (memory forces it) while m2's request is in flight
        assert "m1" not in done and budget.model("m1")["workers"][0]["pid"] is None  # not even spawned
        m2 = budget.model("m2")
        assert m2["state"] == "hot" and m2["in_flight"] == 1 and m2["workers"][0]["pid"] == m2_pid
    finally:
        os.kill(m2_pid, signal.SIGCONT)
    for _ in range(3):
        next(chunks)  # undisturbed
    closed = time.monotonic()
    stream.close()  # the client leaves: m2 goes idle, and only now may it be evicted
    t.join(30)
    assert done["m1"] > closed
    assert budget.model("m1")["state"] == "hot" and budget.model("m2")["state"] == "zero"
    assert m2_pid not in budget.worker_pids("m2")


@pytest.fixture(scope="module")
def evicting(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    # two models under a policy that wants them hot for a minute after each request, on a
    # device where only one fits
    config = {
        "devices": {"cpu": {"memory_budget": 1000}},
        "models": [{"path": tiny_model, "name": n, "memory_estimate": 600, "keep_alive_policy": "ttl:60"}
                   for n in ("p1", "p2")],
    }
    g = Gateway(config, str(tmp_path_factory.mktemp("evicting")))
    yield g
    g.stop()


def test_an_evicted_model_waits_for_a_request_to_come_back(evicting: Gateway) -> None:
    # the fleet moved p1 down for room: its policy (still within its minute) does not climb it
    # straight back, which would evict p2 in turn, and so on
    client = evicting.openai()
    client.completions.create(model="p1", prompt="x", max_tokens=1)
    client.completions.create(model="p2", prompt="x", max_tokens=1)
    time.sleep(3.0)
    assert evicting.model("p1")["state"] == "zero" and evicting.model("p2")["state"] == "hot"
    assert evicting.cold_starts("p1") == 1 and evicting.cold_starts("p2") == 1
    assert evicting.metric("zerostart_replica_stops_total", model="p1", reason="evicted") == 1
    assert evicting.metric("zerostart_replica_stops_total", model="p2", reason="evicted") == 0
    # a request brings it back (and p2, idle, makes room)
    client.completions.create(model="p1", prompt="x", max_tokens=1)
    assert evicting.cold_starts("p1") == 2 and evicting.model("p2")["state"] == "zero"


@pytest.fixture(scope="module")
def three(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    # three models, two fit; a stop may take up to 5 s before the worker is killed
    config = {
        "devices": {"cpu": {"memory_budget": 1000}},
        "models": [{"path": tiny_model, "name": n, "memory_estimate": 400, "idle_timeout": 60, "stop_timeout": 5}
                   for n in ("q1", "q2", "q3")],
    }
    g = Gateway(config, str(tmp_path_factory.mktemp("three")))
    yield g
    g.stop()


def test_a_start_waits_for_the_memory_already_on_its_way_instead_of_evicting_more(three: Gateway) -> None:
    client = three.openai()
    first = client.completions.with_raw_response.create(model="q1", prompt="x", max_tokens=1)
    assert first.headers["x-zerostart-cold-start-rung"] in ("source", "image")  # image: one written earlier
    client.completions.create(model="q2", prompt="x", max_tokens=1)
    # the one to go is the cheapest to restart, the least recently used (q1) among like costs: q2
    # may have started from the image q1's start wrote, or faster on a quieter machine
    victim = choose_victim([Candidate("q1", three.model("q1")["restart_s"], 0.0),
                            Candidate("q2", three.model("q2")["restart_s"], 1.0)])
    assert victim is not None
    other = "q2" if victim == "q1" else "q1"
    os.kill(three.model(victim)["workers"][0]["pid"], signal.SIGSTOP)  # it will take its stop_timeout to go
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.update(r=client.completions.with_raw_response.create(
        model="q3", prompt="x", max_tokens=1)))
    t.start()
    three.wait_for(f"{victim} to be stopped for q3", lambda: three.model(victim)["state"] == "stopping")
    # the other serves while the victim stops; going idle again, it is a candidate, but the room q3
    # needs is already on its way: q3 waits for it rather than stopping the other as well
    hot = client.completions.with_raw_response.create(model=other, prompt="x", max_tokens=1)
    assert "x-zerostart-cold-start-rung" not in hot.headers and hot.headers["x-zerostart-cold-start-ms"] == "0"
    t.join(60)
    assert done["r"].headers["x-zerostart-cold-start-rung"] in ("source", "image")
    assert three.model("q3")["state"] == "hot" and three.model(other)["state"] == "hot"
    assert three.metric("zerostart_replica_stops_total", model=victim, reason="evicted") == 1
    assert three.metric("zerostart_replica_stops_total", model=other, reason="evicted") == 0
