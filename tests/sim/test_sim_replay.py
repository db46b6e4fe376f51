import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerostart.policy import CostModel, Decision, Rung, make
from zerostart.sim import Capacity, Service, Start, Trace, TraceError, replay

COSTS = CostModel()
W = {r: COSTS.wake_s(r) for r in Rung}  # parked 0.69 s, image 6.67 s, zero 30.8 s
HOT_S = COSTS.hold_usd_per_s(Rung.HOT)


def trace(events, service_s=1.0):
    """events: [(time, model name)] -> a Trace whose requests each take service_s."""
    names = sorted({m for _, m in events})
    events = sorted(events)
    t = np.array([e[0] for e in events], dtype=np.float64)
    return Trace(times=t - t[0], models=np.array([names.index(m) for _, m in events], dtype=np.int32),
                 model_names=names, input_tokens=None, output_tokens=None, source="test", format="csv"), \
        Service(fixed_s=service_s)


class Scripted:
    """A policy that answers with a fixed function of (view, now)."""

    def __init__(self, fn, rungs=(Rung.HOT, Rung.PARKED, Rung.IMAGE, Rung.ZERO)):
        self.fn, self.rungs, self.name = fn, rungs, "scripted"
        self.arrivals, self.completions = [], []

    def observe_arrival(self, model, t):
        self.arrivals.append((model, t))

    def observe_completion(self, model, t):
        self.completions.append((model, t))

    def decide(self, view, now):
        return self.fn(view, now)


def test_always_warm_costs_every_model_every_second():
    tr, svc = trace([(0, "a"), (100, "b"), (3600, "a")])
    r = replay(make("always"), tr, COSTS, service=svc)
    span = 3601.0
    assert r["cold_starts"] == 0 and r["p99_added_latency_s"] == 0.0 and r["delayed_requests"] == 0
    assert r["gpu_hours"] == pytest.approx(2 * span / 3600)
    assert r["total_cost_usd"] == pytest.approx(2 * span * HOT_S)
    assert r["cost_vs_always_warm"] == pytest.approx(1.0)
    assert r["usd_per_1k_requests"] == pytest.approx(r["total_cost_usd"] / 3 * 1000)


def test_ttl_replay_by_hand():
    # one model; HOT at 0; requests at 0 and 5 (warm); ttl 10 s expires at 16; the request at 30
    # climbs from IMAGE and is served from 30 + 6.67 to 37.67
    tr, svc = trace([(0, "m"), (5, "m"), (30, "m")])
    r = replay(make("ttl:10"), tr, COSTS, service=svc)
    wake = W[Rung.IMAGE]
    assert r["cold_starts_by_rung"] == {"parked": 0, "image": 1, "zero": 0}
    assert r["max_added_latency_s"] == pytest.approx(wake)
    assert r["p50_added_latency_s"] == 0.0
    assert r["p99_added_latency_s"] == pytest.approx(np.percentile([0, 0, wake], 99))
    end = 30 + wake + 1
    assert r["hours"] * 3600 == pytest.approx(end)
    hot_s = 16 + (end - 30)  # [0, 16) and the climb plus service
    assert r["rung_hours"]["hot"] * 3600 == pytest.approx(hot_s)
    assert r["rung_hours"]["image"] * 3600 == pytest.approx(14)
    assert r["gpu_usd"] == pytest.approx(hot_s * HOT_S)
    # the image sits on disk for the whole run once used
    assert r["disk_usd"] == pytest.approx(16 * end / (730 * 3600) * 0.08)
    assert r["total_cost_usd"] == pytest.approx(r["gpu_usd"] + r["disk_usd"])
    assert r["latency_cost_usd"] == pytest.approx(wake * COSTS.latency_usd_per_s)


def test_parked_costs_host_ram():
    tr, svc = trace([(0, "m"), (100, "m")])
    r = replay(make("ttl:0,down=parked"), tr, COSTS, service=svc)
    # ttl 0 starts the model PARKED; request 0 climbs (0.69 s) and is served for 1 s, the model
    # parks again until 100, climbs and serves
    wake = W[Rung.PARKED]
    assert r["cold_starts_by_rung"]["parked"] == 2
    assert r["rung_hours"]["parked"] * 3600 == pytest.approx(100 - (wake + 1))
    assert r["rung_hours"]["hot"] * 3600 == pytest.approx(2 * (wake + 1))
    assert r["host_ram_gb_hours"] == pytest.approx((100 - wake - 1) * (16 + 1) / 3600)
    assert r["host_ram_usd"] == pytest.approx(r["host_ram_gb_hours"] * 0.004237)


def test_requests_during_a_climb_join_it_and_busy_models_never_move_down():
    # a policy that always wants ZERO: the model must still stay HOT while serving
    p = Scripted(lambda view, now: Decision(Rung.ZERO))
    tr, svc = trace([(0, "m"), (10, "m"), (11, "m"), (12.5, "m")], service_s=30.0)
    r = replay(p, tr, COSTS, service=svc)
    wake = W[Rung.ZERO]
    # the request at 0 climbs from ZERO (ready at 30.8); the next three join that climb, and
    # the model stays HOT until the last of them is served although the policy says ZERO
    assert r["cold_starts"] == 1
    assert r["max_added_latency_s"] == pytest.approx(wake)
    assert r["mean_added_latency_s"] == pytest.approx((wake + (wake - 10) + (wake - 11) + (wake - 12.5)) / 4)
    # all four are served together from 30.8 to 60.8; the model is HOT (climbing, then busy) throughout
    assert r["rung_hours"]["hot"] * 3600 == pytest.approx(wake + 30) == r["hours"] * 3600
    # the policy saw every arrival and completion, in order per model
    assert [t for _, t in p.arrivals] == [0, 10, 11, 12.5]
    assert len(p.completions) == 4


def test_prewarm_is_taken_and_counted():
    # after each idle start: rest on IMAGE, pre-warm at +50 (climb 6.67 s), HOT until +200
    def fn(view, now):
        if view.busy:
            return Decision(Rung.HOT)
        t0 = view.last_active
        if now < t0 + 50:
            return Decision(Rung.IMAGE, prewarm_at=t0 + 50, recheck_at=t0 + 50)
        if now < t0 + 200:
            return Decision(Rung.HOT, recheck_at=t0 + 200)
        return Decision(Rung.IMAGE)

    p = Scripted(fn)
    tr, svc = trace([(0, "m"), (101, "m"), (1000, "m")])
    r = replay(p, tr, COSTS, service=svc)
    # starts on IMAGE: request 0 climbs (6.67 s), idle from 7.67: pre-warm at 57.67, request at
    # 101 is warm (a hit); idle from 102: pre-warm at 152, HOT until 302, request 1000 climbs
    assert r["prewarms"] == 2 and r["prewarm_hits"] == 1
    assert r["cold_starts_by_rung"]["image"] == 2
    assert r["max_added_latency_s"] == pytest.approx(W[Rung.IMAGE])
    assert r["mean_added_latency_s"] == pytest.approx(2 * W[Rung.IMAGE] / 3)


def test_hot_capacity_evicts_the_least_recently_used_idle_model():
    tr, svc = trace([(0, "a"), (2, "b"), (20, "a")])
    r = replay(make("ttl:1000"), tr, COSTS, capacity=Capacity(hot=1), service=svc)
    # a starts HOT (the only slot), b on IMAGE; b at 2 evicts idle a; a at 20 evicts idle b
    assert r["cold_starts_by_rung"] == {"parked": 0, "image": 2, "zero": 0}
    assert r["evictions"] == 2
    assert r["max_added_latency_s"] == pytest.approx(W[Rung.IMAGE])
    assert r["rung_hours"]["hot"] * 3600 <= r["hours"] * 3600 + 1e-9  # never two HOT at once


def test_requests_wait_for_a_device_when_every_hot_model_is_busy():
    tr, svc = trace([(0, "a"), (1, "b")], service_s=10.0)
    r = replay(make("always"), tr, COSTS, capacity=Capacity(hot=1, parked=0), service=svc)
    # a serves [0, 10); b waits for it, then climbs from IMAGE (no parking)
    assert r["queued_requests"] == 1
    assert r["max_added_latency_s"] == pytest.approx(9 + W[Rung.IMAGE])
    assert r["cold_starts_by_rung"]["image"] == 1


def test_parked_capacity_pushes_the_oldest_parked_model_to_image():
    tr, svc = trace([(0, "a"), (0.5, "b"), (100, "a")])
    r = replay(make("ttl:0,down=parked"), tr, COSTS, capacity=Capacity(parked=1), service=svc)
    # a starts PARKED (the one place), b on IMAGE; both climb; a parks at 1.69, b parks at 8.17
    # and pushes a to IMAGE: a's request at 100 wakes from IMAGE, and a parking again pushes b
    assert r["cold_starts_by_rung"] == {"parked": 1, "image": 2, "zero": 0} and r["evictions"] == 2
    assert r["max_added_latency_s"] == pytest.approx(W[Rung.IMAGE])


def test_capacity_parsing():
    assert Capacity.parse("hot=8,parked=32") == Capacity(8, 32)
    assert Capacity.parse(" unlimited ") == Capacity() and Capacity.parse("parked=0") == Capacity(None, 0)
    assert Capacity(8, None).describe() == "hot 8, parked unlimited"
    assert Capacity.parse("memory_gb=1.5,kv_gb=0.25") == Capacity(memory_gb=1.5, kv_gb=0.25)
    assert "memory 1.5 GB shared by hot and parked models" in Capacity(memory_gb=1.5).describe()
    for bad in ("hot=0", "gpus=4", "hot=many", "memory_gb=0", "kv_gb=-1", "memory_gb=lots"):
        with pytest.raises(TraceError, match="--capacity"):
            Capacity.parse(bad)


def test_service_time_from_tokens():
    tr, _ = trace([(0, "m"), (1, "m")])
    tr.input_tokens = np.array([10_000, 0])
    tr.output_tokens = np.array([50, 100])
    assert Service().durations(tr).tolist() == [pytest.approx(2.0), pytest.approx(2.0)]


events = st.lists(st.tuples(st.floats(0, 5000, allow_nan=False), st.sampled_from("abcd")), min_size=1, max_size=60)


@settings(max_examples=40, deadline=None)
@given(events, st.sampled_from(["always", "ttl:30", "ttl:0,down=parked", "hybrid", "ladder", "ladder:p99=1"]),
       st.sampled_from([Capacity(), Capacity(hot=1), Capacity(hot=2, parked=1)]), st.floats(0.1, 60))
def test_replay_invariants(ev, spec, capacity, service_s):
    tr, svc = trace(ev, service_s)
    r = replay(make(spec, COSTS), tr, COSTS, capacity=capacity, service=svc)
    n_models = len(tr.model_names)
    # every model is somewhere all the time; capacity is never exceeded on average
    assert sum(r["rung_hours"].values()) == pytest.approx(n_models * r["hours"], rel=1e-9, abs=1e-9)
    if capacity.hot is not None:
        assert r["rung_hours"]["hot"] <= capacity.hot * r["hours"] + 1e-9
    assert r["requests"] == len(ev) and 0 <= r["p50_added_latency_s"] <= r["p99_added_latency_s"]
    assert r["cold_starts"] <= len(ev) + r["queued_requests"]
    assert r["total_cost_usd"] <= r["always_warm_cost_usd"] * (1 + 1e-9) + 16 * 0.08 * n_models  # disk at most
    assert r["delayed_requests"] >= min(r["cold_starts"], 1) * (r["cold_starts"] > 0)


def test_empty_trace_is_refused():
    tr, svc = trace([(0, "m")])
    tr.times = tr.times[:0]
    tr.models = tr.models[:0]
    with pytest.raises(TraceError, match="empty"):
        replay(make("always"), tr, COSTS, service=svc)


def test_a_shared_memory_budget_counts_parked_weights_and_stops_the_least_recently_used():
    # 16 GB models; 40 GB shared, as on a CPU server: HOT holds 16 + 4 GB of KV cache, PARKED 16
    cap = Capacity(memory_gb=40, kv_gb=4)
    tr, svc = trace([(0, "a"), (0.5, "b"), (0.7, "c"), (10, "a"), (20, "c")], service_s=1.0)
    r = replay(make("ttl:0,down=parked"), tr, COSTS, capacity=cap, service=svc)
    p, i = W[Rung.PARKED], W[Rung.IMAGE]
    # a and b start PARKED (32 GB), c on IMAGE (no room for a third). a wakes (36 GB), b wakes
    # (40 GB); c finds both busy and waits until a is done at p + 1, which stops a (IMAGE)
    # b parks at 0.5 + p + 1, c at ... + i + 1; a at 10 stops the least recently used parked
    # model (b), and c at 20 wakes from PARKED
    assert r["queued_requests"] == 1 and r["evictions"] == 2
    assert r["cold_starts_by_rung"] == {"parked": 3, "image": 2, "zero": 0}
    assert r["max_added_latency_s"] == pytest.approx(p + 1 - 0.7 + i)


def test_a_budget_evicts_the_model_idle_longest():
    cap = Capacity(memory_gb=32)  # two 16 GB models HOT, nothing for a third
    tr, svc = trace([(0, "a"), (1, "b"), (5, "a"), (20, "c"), (40, "b")], service_s=1.0)
    r = replay(make("always"), tr, COSTS, capacity=cap, service=svc)
    # c at 20 stops b (idle since 2; a since 6); b at 40 stops a (idle since 6; c since 20 + climb + 1)
    assert r["evictions"] == 2 and r["cold_starts_by_rung"] == {"parked": 0, "image": 2, "zero": 0}
    assert r["rung_hours"]["hot"] * 3600 <= 2 * r["hours"] * 3600 + 1e-9


def test_a_fresh_server_loads_each_model_from_source_once_and_then_from_its_image():
    tr, svc = trace([(0, "m"), (100, "m"), (200, "m")])
    r = replay(make("ttl:10,down=zero"), tr, COSTS, service=svc, start=Start(fresh=True, keep_images=True))
    assert r["cold_starts_by_rung"] == {"parked": 0, "image": 2, "zero": 1}
    assert r["max_added_latency_s"] == pytest.approx(W[Rung.ZERO])
    # without images kept, every climb after ttl is from zero; at rest, the first is warm
    r = replay(make("ttl:10,down=zero"), tr, COSTS, service=svc, start=Start(fresh=True))
    assert r["cold_starts_by_rung"] == {"parked": 0, "image": 0, "zero": 3}
    r = replay(make("ttl:10,down=zero"), tr, COSTS, service=svc)
    assert r["cold_starts_by_rung"] == {"parked": 0, "image": 0, "zero": 2} and r["p50_added_latency_s"] > 0


def test_a_fresh_model_goes_up_only_by_climbing():
    # ttl:10 rests on IMAGE; a fresh model on ZERO is not moved up to IMAGE for free
    tr, svc = trace([(0, "m")])
    r = replay(make("ttl:10"), tr, COSTS, service=svc, start=Start(fresh=True, keep_images=True))
    assert r["cold_starts_by_rung"]["zero"] == 1


def test_an_evicted_model_is_not_climbed_back_by_its_policy_but_still_moved_down():
    # HOT for 20 s after the last request, then IMAGE; one device (evictions go to PARKED)
    def fn(view, now):
        if view.busy or now < view.last_active + 20:
            return Decision(Rung.HOT, recheck_at=view.last_active + 20)
        return Decision(Rung.IMAGE)

    p = Scripted(fn)
    tr, svc = trace([(0, "a"), (5, "b"), (100, "a")])
    r = replay(p, tr, COSTS, capacity=Capacity(hot=1), service=svc)
    # b starts PARKED (one device, a has it); b at 5 evicts idle a to PARKED; a's policy still
    # wants it HOT (until 21) but may not climb it back (that would evict b); at 21 it moves a
    # down to IMAGE. b goes to IMAGE on its own at 5 + wake + 1 + 20; a at 100 climbs from IMAGE.
    assert r["prewarms"] == 0 and r["evictions"] == 1
    assert r["cold_starts_by_rung"] == {"parked": 1, "image": 1, "zero": 0}
    assert r["rung_hours"]["parked"] * 3600 == pytest.approx(5 + (21 - 5))
