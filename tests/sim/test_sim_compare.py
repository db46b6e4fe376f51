"""The measured columns of a replay, from a hand-built run: what counts as a cold start, an
added latency and a device-hour."""

import pytest

from zerostart.names import Climb
from zerostart.policy import CostModel, Rung
from zerostart.sim._compare import fit_service, live_wake_costs, measured, side_by_side, summary
from zerostart.sim._live import LiveRun, Sample, Sent

COSTS = CostModel()


def run() -> LiveRun:
    # two models over 10 s: a request that waited 2 s for a climb, two warm ones, one refused
    sent = [Sent(0, "a", at=0.0, prompt_tokens=8, max_tokens=4, sent=0.0, done=2.5, status=200, cold_start_s=2.0,
                 queue_s=0.0, rung=Climb.SOURCE, usage={"prompt_tokens": 9, "completion_tokens": 4}),
            Sent(1, "a", at=3.0, prompt_tokens=8, max_tokens=4, sent=3.0, done=3.5, status=200, cold_start_s=0.0,
                 queue_s=0.0, usage={"prompt_tokens": 9, "completion_tokens": 4}),
            Sent(2, "b", at=4.0, prompt_tokens=8, max_tokens=4, sent=4.0, done=4.1, status=429, cold_start_s=0.0,
                 error="queue full"),
            Sent(3, "b", at=5.0, prompt_tokens=8, max_tokens=4, sent=5.0, done=10.0, status=0, error="ReadTimeout")]
    samples = [Sample(0.0, {"starting": 1, "hot": 0, "parked": 0}, {"cpu": 100e6}, 1, 0),
               Sample(2.0, {"starting": 0, "hot": 1, "parked": 1}, {"cpu": 200e6}, 0, 1),
               Sample(6.0, {"starting": 0, "hot": 0, "stopping": 1, "parked": 1}, {"cpu": 200e6}, 0, 0),
               Sample(8.0, {"hot": 0, "parked": 1}, {"cpu": 100e6}, 0, 0),
               Sample(12.0, {"hot": 0}, {"cpu": 0.0}, 0, 0)]
    return LiveRun(url="http://x", started_unix=0.0, requests=sent, samples=samples,
                   cold_starts={Climb.SOURCE: 1.0, Climb.STANDBY_IMAGE: 2.0, Climb.PARKED: 3.0},
                   climbs_ahead={Climb.PARKED: 2.0},  # two of the wakes were pre-warms: nobody waited
                   cold_start_seconds={Climb.SOURCE: {"sum": 2.0, "count": 1.0},
                                       Climb.PARKED: {"sum": 0.2, "count": 2.0},
                                       Climb.IMAGE: {"sum": 0.0, "count": 0.0}},
                   status_before={}, status_after={}, lateness_s=0.01)


def test_measured_columns():
    m = measured(run(), COSTS, 1_000_000_000, "ttl:30")
    assert m["requests"] == 4 and m["answered"] == 3  # the one without an answer is left out
    assert m["errors"] == {"429": 1, "no answer": 1}
    # a climb begun with no request waiting is a pre-warm, as the simulator counts it, not a cold start
    assert m["cold_starts_by_rung"] == {"parked": 1, "image": 2, "zero": 1} and m["cold_starts"] == 4
    assert m["prewarms"] == 2 and m["cold_starts_by_label"]["parked"] == 3
    assert m["max_added_latency_s"] == 2.0 and m["delayed_requests"] == 1
    assert m["hours"] * 3600 == pytest.approx(10.0)  # first arrival to last answer
    # starting [0, 2) + hot [2, 6) + stopping [6, 8): 8 replica-seconds hold the device;
    # parked [2, 10): 8 s of (1 GB + the worker's 1 GB)
    assert m["state_hours"]["hot"] * 3600 == pytest.approx(4.0)
    assert m["gpu_hours"] * 3600 == pytest.approx(8.0)
    assert m["host_ram_gb_hours"] * 3600 == pytest.approx(8.0 * 2.0)
    assert m["memory_gb_hours"] * 3600 == pytest.approx(0.1 * 2 + 0.2 * 4 + 0.2 * 2 + 0.1 * 2)
    assert m["total_cost_usd"] == pytest.approx(m["gpu_usd"] + m["host_ram_usd"])
    assert m["gpu_usd"] == pytest.approx(8.0 * COSTS.hold_usd_per_s(Rung.HOT))


def test_live_wake_times_replace_the_measured_ones_where_the_run_climbed():
    base = COSTS.with_coldstart({"rungs": {"source": {"median_s": 5.0}, "image": {"median_s": 4.0},
                                           "parked": {"median_s": 1.0}}}, model="*")
    c = live_wake_costs(base, run())
    assert c.wake_s(Rung.ZERO) == 2.0 and c.wake_s(Rung.PARKED) == pytest.approx(0.1)
    assert c.wake_s(Rung.IMAGE) == 4.0  # not climbed in the run: the coldstart file's


def test_service_fit_needs_enough_waitless_requests_and_the_tables_print():
    assert fit_service(run()) is None
    m = measured(run(), COSTS, 1_000_000_000, "ttl:30")
    text = side_by_side(m, m)
    assert "cold starts parked/image/zero" in text and "1/2/1" in text and "1.00" in text
    assert any(line.split()[:2] == ["pre-warms", "2"] for line in text.splitlines())
    assert "ttl:30" in summary([{"simulated": m, "measured": m}])
