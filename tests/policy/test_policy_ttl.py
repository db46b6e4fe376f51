import pytest

from zerostart.policy import AlwaysWarm, FixedTTL, ModelView, PolicyError, Rung


def view(last, rung=Rung.HOT, busy=False, name="m"):
    return ModelView(name, rung, busy, last)


def test_always_warm_stays_hot_whatever_the_idle_time():
    p = AlwaysWarm()
    p.observe_arrival("m", 0.0)
    p.observe_completion("m", 1.0)
    for now in (1.0, 3600.0, 86400.0 * 30):
        d = p.decide(view(1.0), now)
        assert d.rung is Rung.HOT and d.prewarm_at is None and d.recheck_at is None
    assert p.decide(view(1.0, rung=Rung.IMAGE), 10.0).rung is Rung.HOT  # climbs back after an eviction
    assert p.rungs == (Rung.HOT,)


def test_ttl_keeps_hot_until_the_timeout_then_drops():
    p = FixedTTL(300.0)
    # arrivals at 0 and 100, each served for 2 s
    for a in (0.0, 100.0):
        p.observe_arrival("m", a)
        p.observe_completion("m", a + 2.0)
    d = p.decide(view(102.0), 102.0)
    assert d.rung is Rung.HOT and d.recheck_at == 402.0
    assert p.decide(view(102.0), 401.9).rung is Rung.HOT
    d = p.decide(view(102.0), 402.0)
    assert d.rung is Rung.IMAGE and d.recheck_at is None and d.prewarm_at is None
    assert p.decide(view(102.0), 1e6).rung is Rung.IMAGE


def test_ttl_never_moves_a_busy_model_down_and_drops_to_its_rung():
    p = FixedTTL(30.0, down=Rung.PARKED)
    assert p.decide(view(0.0, busy=True), 1e6).rung is Rung.HOT
    assert p.decide(view(0.0), 30.0).rung is Rung.PARKED
    assert p.rungs == (Rung.HOT, Rung.PARKED)
    zero = FixedTTL(0.0, down=Rung.ZERO)
    assert zero.decide(view(5.0), 5.0).rung is Rung.ZERO  # ttl 0: down as soon as idle


def test_ttl_rejects_bad_arguments():
    with pytest.raises(PolicyError, match="non-negative"):
        FixedTTL(-1.0)
    with pytest.raises(PolicyError, match="always"):
        FixedTTL(10.0, down=Rung.HOT)
