import math

import pytest

from tests.policy._feed import feed
from zerostart.policy import HybridHistogram, ModelView, PolicyError, Rung
from zerostart.policy._hybrid import forecast_idle

H = 3600.0


def view(last, rung=Rung.HOT, busy=False):
    return ModelView("m", rung, busy, last)


def test_too_few_samples_uses_the_standard_keep_alive():
    p = HybridHistogram()
    t0 = feed(p, [600.0] * 5)  # 5 idle times < min_samples=10
    assert p.windows("m") == ("too few samples", 0.0, 4 * H)
    d = p.decide(view(t0), t0 + 10)
    assert d.rung is Rung.HOT and d.recheck_at == t0 + 4 * H and d.prewarm_at is None
    assert p.decide(view(t0), t0 + 4 * H).rung is Rung.IMAGE
    assert p.windows("never seen") == ("too few samples", 0.0, 4 * H)


def test_representative_histogram_prewarms_at_the_head_and_keeps_to_the_tail():
    p = HybridHistogram()
    t0 = feed(p, [600.0 + i for i in range(20)])  # all in the 10-minute bin: CV ~ 15
    branch, prewarm, until = p.windows("m")
    assert branch == "histogram"
    assert prewarm == pytest.approx(0.9 * 600)  # lower edge of the head bin, minus 10%
    assert until == pytest.approx(1.1 * 660)  # upper edge of the tail bin, plus 10%
    # timeline after an idle start at t0: down at once, pre-warm at +540, HOT until +726
    d = p.decide(view(t0), t0 + 1)
    assert d.rung is Rung.IMAGE and d.prewarm_at == pytest.approx(t0 + 540) and d.recheck_at == d.prewarm_at
    d = p.decide(view(t0, rung=Rung.IMAGE), t0 + 540)
    assert d.rung is Rung.HOT and d.recheck_at == pytest.approx(t0 + 726)
    assert p.decide(view(t0), t0 + 726).rung is Rung.IMAGE
    assert p.decide(view(t0, busy=True), t0 + 1).rung is Rung.HOT  # never down while busy


def test_head_in_the_first_bin_means_no_prewarm_keep_alive_from_the_idle_start():
    p = HybridHistogram(down=Rung.PARKED)
    t0 = feed(p, [30.0] * 20)
    assert p.windows("m") == ("histogram", 0.0, pytest.approx(66.0))
    d = p.decide(view(t0), t0)
    assert d.rung is Rung.HOT and d.recheck_at == pytest.approx(t0 + 66) and d.prewarm_at is None
    assert p.decide(view(t0), t0 + 66).rung is Rung.PARKED


def test_percentiles_pick_head_and_tail_bins_separately():
    p = HybridHistogram()
    # 1 gap in bin 2, 98 in bin 5, 1 in bin 30: head (5%) is bin 5, tail (99%) is bin 5
    feed(p, [150.0] + [320.0] * 98 + [1810.0])
    branch, prewarm, until = p.windows("m")
    assert branch == "histogram"
    assert prewarm == pytest.approx(0.9 * 300) and until == pytest.approx(1.1 * 360)
    # 10 in bin 1, 90 in bin 20: the head moves to bin 1, the tail to bin 20
    q = HybridHistogram()
    feed(q, [70.0] * 10 + [1210.0] * 90)
    assert q.windows("m")[1:] == (pytest.approx(0.9 * 60), pytest.approx(1.1 * 21 * 60))


def test_flat_histogram_is_not_representative_at_the_cv_threshold():
    # 4 idle times in each of 60 bins: bin counts mean 1, std sqrt(3): CV = 1.73
    gaps = [60.0 * b + 10 + j for b in range(60) for j in range(4)]
    flat = HybridHistogram()
    t0 = feed(flat, gaps)
    assert flat.windows("m") == ("not representative", 0.0, 4 * H)
    assert flat.decide(view(t0), t0 + 1).recheck_at == t0 + 4 * H
    looser = HybridHistogram(cv=1.7)  # the same histogram passes a lower threshold
    feed(looser, gaps)
    assert looser.windows("m")[0] == "histogram"
    # one idle time per bin: every count equal, CV 0
    even = HybridHistogram()
    feed(even, [60.0 * b + 30 for b in range(240)])
    assert even.windows("m")[0] == "not representative"


def test_mostly_out_of_range_idle_times_switch_to_the_forecast():
    p = HybridHistogram()
    t0 = feed(p, [5 * H] * 12)  # every idle time past the 4-hour range
    branch, prewarm, until = p.windows("m")
    assert branch == "forecast"
    assert prewarm == pytest.approx(0.85 * 5 * H) and until == pytest.approx(1.15 * 5 * H)
    d = p.decide(view(t0), t0 + 60)
    assert d.rung is Rung.IMAGE and d.prewarm_at == pytest.approx(t0 + 0.85 * 5 * H)
    assert p.decide(view(t0, rung=Rung.IMAGE), t0 + 0.9 * 5 * H).rung is Rung.HOT
    assert p.decide(view(t0), t0 + 1.15 * 5 * H).rung is Rung.IMAGE


def test_out_of_range_share_below_the_threshold_keeps_the_histogram():
    p = HybridHistogram()
    feed(p, [5 * H] * 4 + [610.0] * 8)  # a third out of range
    branch, prewarm, until = p.windows("m")
    assert branch == "histogram"  # from the in-range idle times alone
    assert prewarm == pytest.approx(540) and until == pytest.approx(726)
    q = HybridHistogram(oob=0.3)  # the same history past a lower threshold
    feed(q, [5 * H] * 4 + [610.0] * 8)
    assert q.windows("m")[0] == "forecast"


def test_forecast_is_an_ar1_of_log_idle_times():
    assert forecast_idle([100.0]) == pytest.approx(100.0)
    assert forecast_idle([100.0, 10000.0]) == pytest.approx(1000.0)  # geometric mean below 3 samples
    assert forecast_idle([700.0] * 10) == pytest.approx(700.0)
    # alternating long and short: after a long one, expect a short one
    seq = [1000.0, 100000.0] * 8
    f = forecast_idle(seq)
    assert f < math.sqrt(1000.0 * 100000.0) / 5
    # a steady trend upward continues upward relative to the mean
    up = [100.0 * 1.5**i for i in range(10)]
    assert forecast_idle(up) > math.exp(sum(math.log(x) for x in up) / len(up))
    with pytest.raises(PolicyError):
        forecast_idle([])


def test_only_idle_gaps_are_samples():
    p = HybridHistogram(min_samples=1)
    p.observe_arrival("m", 0.0)
    p.observe_arrival("m", 1.0)  # while busy: no idle time
    p.observe_completion("m", 5.0)
    p.observe_completion("m", 6.0)  # idle from 6
    p.observe_arrival("m", 606.0)  # one idle time: 600 s
    p.observe_completion("m", 607.0)
    assert p.windows("m") == ("histogram", pytest.approx(540.0), pytest.approx(726.0))


def test_models_are_learned_separately_and_bad_arguments_fail():
    p = HybridHistogram()
    feed(p, [30.0] * 20, model="a")
    assert p.windows("a")[0] == "histogram" and p.windows("b")[0] == "too few samples"
    with pytest.raises(PolicyError):
        HybridHistogram(head=0.99, tail=0.05)
    with pytest.raises(PolicyError):
        HybridHistogram(bin_s=0)
    with pytest.raises(PolicyError):
        HybridHistogram(down=Rung.HOT)
