import math

import pytest

from tests.policy._feed import feed
from zerostart.policy import LADDER, CostAwareLadder, CostModel, ModelView, PolicyError, Rung

COSTS = CostModel()


def view(last, rung=Rung.HOT, busy=False, model="m"):
    return ModelView(model, rung, busy, last)


def follow(p, t0, model="m", limit=20):
    """Decisions from an idle start, applied as a caller would: [(time, rung, prewarm)]."""
    out, now, rung = [], t0, Rung.HOT
    for _ in range(limit):
        d = p.decide(view(t0, rung, model=model), now)
        out.append((now - t0, d.rung, d.prewarm_at))
        rung = d.rung
        nxt = d.prewarm_at if d.prewarm_at is not None else d.recheck_at
        if nxt is None:
            return out
        assert nxt > now  # never asks to be rechecked in the past
        now = nxt
    raise AssertionError(f"no final rung after {limit} decisions: {out}")


def test_break_even_schedule_without_history():
    p = CostAwareLadder(COSTS)
    steps = follow(p, 1000.0)
    times = [t for t, _, _ in steps]
    rungs = [r for _, r, _ in steps]
    assert rungs == [Rung.HOT, Rung.PARKED, Rung.IMAGE, Rung.ZERO]
    assert times[1] == pytest.approx(COSTS.break_even_s(Rung.HOT, Rung.PARKED))
    assert times[2] == pytest.approx(COSTS.break_even_s(Rung.PARKED, Rung.IMAGE))
    assert times[3] == pytest.approx(COSTS.break_even_s(Rung.IMAGE, Rung.ZERO))
    assert p.plan("m").kind == "break-even"


def test_break_even_skips_rungs_that_are_not_allowed_or_never_pay():
    p = CostAwareLadder(COSTS, rungs=(Rung.HOT, Rung.IMAGE))
    steps = follow(p, 0.0)
    assert [r for _, r, _ in steps] == [Rung.HOT, Rung.IMAGE]
    assert steps[1][0] == pytest.approx(COSTS.break_even_s(Rung.HOT, Rung.IMAGE))
    # with RAM as dear as a device, parking never wins: straight to IMAGE
    dear_ram = CostModel(host_ram_usd_per_gb_hour=1.0)
    q = CostAwareLadder(dear_ram)
    assert [r for _, r, _ in follow(q, 0.0)][:2] == [Rung.HOT, Rung.IMAGE]


def test_learned_busy_model_stays_hot_through_its_short_gaps():
    p = CostAwareLadder(COSTS)
    t0 = feed(p, [1.0 + 0.05 * (i % 5) for i in range(40)])  # idle 1.0 to 1.2 s
    assert p.plan("m").kind == "learned"
    for at in (0.0, 0.5, 0.99):
        d = p.decide(view(t0), t0 + at)
        assert d.rung is Rung.HOT and d.recheck_at is not None and d.recheck_at >= t0 + 1.2


def test_learned_sporadic_model_leaves_hot_at_once():
    p = CostAwareLadder(COSTS)
    t0 = feed(p, [1800.0 * (1 + 0.5 * (i % 3)) for i in range(40)])  # 30 to 60 min gaps
    d = p.decide(view(t0), t0)
    assert d.rung is not Rung.HOT


def test_learned_periodic_model_rests_low_and_prewarms_before_the_next_request():
    p = CostAwareLadder(COSTS)
    t0 = feed(p, [7200.0] * 30)  # exactly every two hours
    steps = follow(p, t0)
    assert steps[0][1] is not Rung.HOT
    prewarms = [(t, pw) for t, _, pw in steps if pw is not None]
    assert prewarms, steps
    _, at = prewarms[-1]
    low = [r for _, r, pw in steps if pw is not None][-1]
    # the climb starts early enough to be HOT when the request comes, and not hours early
    assert at + COSTS.wake_s(low) <= t0 + 7200.0
    assert at >= t0 + 7200.0 / 1.25 - COSTS.wake_s(low) - 1e-6
    hot = p.decide(view(t0, rung=low), at)
    assert hot.rung is Rung.HOT
    # without pre-warm it must hold a rung fast enough instead, or accept the wait
    q = CostAwareLadder(COSTS, prewarm=False)
    t1 = feed(q, [7200.0] * 30)
    assert all(pw is None for _, _, pw in follow(q, t1))


def test_busy_models_stay_hot_and_foreign_rungs_are_left_for_allowed_ones():
    p = CostAwareLadder(COSTS, rungs=(Rung.HOT, Rung.IMAGE))
    feed(p, [3600.0] * 20)
    assert p.decide(view(0.0, busy=True), 1e6).rung is Rung.HOT
    # a caller put it on PARKED (a capacity eviction): the policy answers with a rung it uses
    d = p.decide(view(100.0, rung=Rung.PARKED), 101.0)
    assert d.rung in (Rung.HOT, Rung.IMAGE)


def test_plans_are_solved_lazily_and_refreshed_with_new_samples():
    p = CostAwareLadder(COSTS, min_samples=4)
    feed(p, [10.0] * 3)
    first = p.plan("m")
    assert first.kind == "break-even" and p.plan("m") is first
    feed(p, [10.0] * 2, start=1000.0)
    assert p.plan("m").kind == "learned"


def test_p99_target_steers_the_penalty_on_slow_wakes():
    slow = CostAwareLadder(COSTS, p99_target_s=1.0, control_every=10, control_memory=50, start_level=-10)
    before = slow.slow_wake_usd
    assert before > 0 and slow.latency_usd_per_s == 0.0  # wakes within the target cost device time only
    # hour-long gaps: the plan rests on IMAGE or lower at each arrival, all slower than 1 s
    t = 0.0
    for _ in range(60):
        slow.observe_arrival("m", t)
        slow.observe_completion("m", t + 1)
        slow.decide(view(t + 1), t + 1)  # keeps the model's plan current
        t += 3601.0
    assert slow.slow_wake_usd > before
    # a high penalty keeps that model PARKED (fast enough): nothing is slow, the penalty relaxes
    high = CostAwareLadder(COSTS, p99_target_s=1.0, control_every=10, control_memory=50, start_level=10)
    start = high.slow_wake_usd
    t = 0.0
    for _ in range(60):
        high.observe_arrival("m", t)
        high.observe_completion("m", t + 1)
        high.decide(view(t + 1), t + 1)
        t += 3601.0
    assert high.slow_wake_usd < start
    # with a target every rung meets, nothing is slow either
    lax = CostAwareLadder(COSTS, p99_target_s=60.0, control_every=10, control_memory=50)
    start = lax.slow_wake_usd
    t = 0.0
    for _ in range(60):
        lax.observe_arrival("m", t)
        lax.observe_completion("m", t + 1)
        lax.decide(view(t + 1), t + 1)
        t += 3601.0
    assert lax.slow_wake_usd < start
    # no target: no penalty, no steering
    assert CostAwareLadder(COSTS).slow_wake_usd == 0.0


def test_slow_penalty_keeps_models_on_fast_rungs():
    # Target 1 s: only PARKED (0.69 s) is fast. A higher penalty keeps a model parked longer.
    low = CostAwareLadder(COSTS, p99_target_s=1.0, start_level=-10)
    high = CostAwareLadder(COSTS, p99_target_s=1.0, start_level=10)
    for p in (low, high):
        feed(p, [1800.0 * (1 + i % 4) for i in range(40)])
    first_image = {}
    for name, p in (("low", low), ("high", high)):
        steps = follow(p, 1e6)
        first_image[name] = next((t for t, r, _ in steps if r.level >= Rung.IMAGE.level), math.inf)
    assert first_image["high"] > first_image["low"]


def test_invalid_arguments():
    with pytest.raises(PolicyError, match="include hot"):
        CostAwareLadder(COSTS, rungs=(Rung.PARKED, Rung.IMAGE))
    with pytest.raises(PolicyError, match="p99"):
        CostAwareLadder(COSTS, p99_target_s=-1)
    with pytest.raises(PolicyError, match="latency"):
        CostAwareLadder(COSTS, latency_usd_per_s=-0.1)


def _expected_cost(seq, mass, time_in, surv, hold, wake_usd, climb_usd):
    """E[cost] of resting on seq[k] in interval k (the last entry: after the grid)."""
    total = 0.0
    for k, r in enumerate(seq[:-1]):
        total += hold[r] * time_in[k] + wake_usd[r] * mass[k]
    total += wake_usd[seq[-1]] * surv[-1]
    for k in range(1, len(seq)):
        if seq[k] < seq[k - 1]:  # a pre-warm
            total += climb_usd[seq[k - 1]] * surv[k]
    return total


def _schedules(grid, wake_s, prewarm, start=0, k=0):
    """Every rung sequence over the grid from HOT that moves down freely and climbs only to HOT:
    with pre-warm, not after the grid, and not before the rest lasted as long as the climb."""
    if k == len(grid):
        yield ()
        return
    options = set(range(start, 4))
    if prewarm and start > 0 and k < len(grid) - 1 and grid[k] >= 2 * wake_s[start]:
        options.add(0)
    for r in sorted(options):
        for rest in _schedules(grid, wake_s, prewarm, r, k + 1):
            yield (r, *rest)


@pytest.mark.parametrize("prewarm", [False, True])
@pytest.mark.parametrize("samples", [
    [3.0, 3.0, 5.0, 5.0, 5.0, 20.0, 36.0, 36.0],
    [0.5, 0.5, 1.5, 1.5, 30.0, 30.0, 30.0, 38.0],
    [12.0] * 10,
])
def test_dynamic_program_matches_brute_force(samples, prewarm):
    # A tiny grid (0, 1, 2, 4, 8, 16, 32, 40 and the samples) makes every schedule enumerable.
    costs = CostModel(latency_usd_per_s=0.002)
    p = CostAwareLadder(costs, horizon_s=40.0, grid_growth=2.0, prewarm=prewarm, min_samples=2)
    feed(p, samples, service=0.0)
    plan = p.plan("m")
    assert plan.kind == "learned" and len(plan.grid) <= 12  # 4**12 schedules at most
    hold, wake_s, wake_usd, climb_usd = p._prices("m", 0)
    grid, mass, time_in, surv = p._distribution(p._book.log("m").recent)
    assert grid == plan.grid
    best = min(_expected_cost(seq, mass, time_in, surv, hold, wake_usd, climb_usd)
               for seq in _schedules(grid, wake_s, prewarm))
    chosen = _expected_cost(plan.path, mass, time_in, surv, hold, wake_usd, climb_usd)
    assert chosen == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_distribution_of_empirical_samples_without_prior():
    p = CostAwareLadder(COSTS, horizon_s=100.0, grid_growth=2.0, prior_weight=0.0)
    samples = [1.5, 3.0, 10.0, 50.0]
    grid, mass, time_in, surv = p._distribution(samples)
    assert set(samples) <= set(grid) and set(p._grid) <= set(grid)
    for k, s in enumerate(grid):
        assert surv[k] == pytest.approx(sum(x >= s for x in samples) / 4)
    for k in range(len(grid) - 1):
        lo, hi = grid[k], grid[k + 1]
        assert mass[k] == pytest.approx(sum(lo <= x < hi for x in samples) / 4)
        assert time_in[k] == pytest.approx(sum(min(max(x - lo, 0.0), hi - lo) for x in samples) / 4)
    assert sum(mass) == pytest.approx(1.0)


def test_every_rung_is_reachable_by_name():
    assert [r.level for r in LADDER] == [0, 1, 2, 3]
    assert Rung.parse("source") is Rung.ZERO and Rung.parse(" Parked ") is Rung.PARKED
    with pytest.raises(ValueError, match="valid: hot, parked, image, zero"):
        Rung.parse("warm")


def test_fleet_pool_lends_its_shape_to_models_with_few_samples():
    import numpy as np

    p = CostAwareLadder(COSTS)
    for i in range(40):  # 40 models idle exactly 60 s each time: every normalized idle time is 1
        feed(p, [60.0] * 12, model=f"f{i}")
    assert p._pool_shape is not None and np.allclose(p._pool_shape, 1.0)
    # a model with 8 idle times around 600 s borrows the shape at its own scale: 16 of the
    # 24 samples' worth of probability sits exactly at its mean
    grid, mass, _, _ = p._distribution([500.0, 700.0] * 4)
    k = max(i for i, g in enumerate(grid) if g <= 600.0)
    assert mass[k] == pytest.approx(16 / 24)
    # without the pool, the log-uniform prior spreads that weight instead
    q = CostAwareLadder(COSTS, pool_weight=0.0)
    for i in range(40):
        feed(q, [60.0] * 12, model=f"f{i}")
    grid, mass, _, _ = q._distribution([500.0, 700.0] * 4)
    k = max(i for i, g in enumerate(grid) if g <= 600.0)
    assert mass[k] < 0.2


def test_idle_times_are_learned_without_the_policys_own_climbs():
    p = CostAwareLadder(COSTS)
    p.observe_arrival("m", 0.0)
    p.observe_completion("m", 1.0)
    p.decide(view(1.0), 1.0)  # break-even plan: IMAGE after ~55 min idle
    wake = COSTS.wake_s(Rung.IMAGE)
    # the request at 5001 finds the model on IMAGE: it waits `wake`, then takes 1 s
    p.observe_arrival("m", 5001.0)
    p.observe_completion("m", 5001.0 + wake + 1.0)
    p.observe_arrival("m", 5008.0)
    assert p._book.log("m").recent[-1] == pytest.approx(6.0)  # from 5002, where it would have ended
    p.observe_completion("m", 5009.0)
    assert p._shift["m"] == 0.0  # 6 s idle: the plan had it HOT, nothing to take back
    # a request that joins a climb waited only for what was left of it
    q = CostAwareLadder(COSTS)
    q.observe_arrival("m", 0.0)
    q.observe_completion("m", 1.0)
    q.decide(view(1.0), 1.0)
    q.observe_arrival("m", 5001.0)  # starts the climb, ready at 5001 + wake
    q.observe_arrival("m", 5005.0)  # joins it
    q.observe_completion("m", 5001.0 + wake + 1.0)
    q.observe_completion("m", 5001.0 + wake + 2.0)
    assert q._shift["m"] == pytest.approx(5001.0 + wake - 5005.0)
    assert q._book.log("m").idle_since == pytest.approx(5005.0 + 2.0)
