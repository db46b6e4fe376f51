import math

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


def test_ttl_parks_then_drops_the_server_s_default_keep_alive():
    """ttl:60,park=5 is what a model without a keep_alive_policy runs (idle_timeout 60,
    park_after 5): HOT for 5 s idle, PARKED until 60 s, then down."""
    p = FixedTTL(60.0, park_s=5.0)
    assert p.rungs == (Rung.HOT, Rung.PARKED, Rung.IMAGE) and p.name == "ttl:60,park=5"
    d = p.decide(view(10.0), 11.0)
    assert d.rung is Rung.HOT and d.recheck_at == 15.0
    d = p.decide(view(10.0), 15.0)
    assert d.rung is Rung.PARKED and d.recheck_at == 70.0
    assert p.decide(view(10.0, rung=Rung.PARKED), 69.0).rung is Rung.PARKED
    assert p.decide(view(10.0, rung=Rung.PARKED), 70.0).rung is Rung.IMAGE
    # a model that cannot park stays hot until the timeout
    no_park = ModelView("m", Rung.HOT, False, 10.0, rungs=(Rung.HOT, Rung.IMAGE, Rung.ZERO))
    assert p.decide(no_park, 30.0).rung is Rung.HOT and p.decide(no_park, 70.0).rung is Rung.IMAGE
    # parking later than the timeout never happens
    assert FixedTTL(10.0, park_s=30.0).decide(view(0.0), 12.0).rung is Rung.IMAGE
    with pytest.raises(PolicyError, match="park"):
        FixedTTL(10.0, park_s=-1.0)
    with pytest.raises(PolicyError, match="down=parked"):
        FixedTTL(10.0, park_s=1.0, down=Rung.PARKED)


def test_ttl_counts_its_timeout_from_what_asked_for_none():
    """A request that set its own keep_alive is held for that by its caller instead: it puts off
    parking (``last_active``) but not the timeout (``timeout_from``)."""
    p = FixedTTL(60.0, park_s=5.0)
    v = ModelView("m", Rung.HOT, False, last_active=100.0, timeout_from=50.0)  # a keep_alive request at 100
    assert p.decide(v, 101.0).rung is Rung.HOT and p.decide(v, 101.0).recheck_at == 105.0  # parks from 100
    assert p.decide(v, 106.0).rung is Rung.PARKED and p.decide(v, 106.0).recheck_at == 110.0  # times out from 50
    assert p.decide(v, 110.0).rung is Rung.IMAGE
    assert p.decide(ModelView("m", Rung.HOT, False, last_active=100.0), 110.0).rung is Rung.PARKED  # without it
    nothing = ModelView("m", Rung.HOT, False, last_active=100.0, timeout_from=float("-inf"))
    assert p.decide(nothing, 100.0).rung is Rung.IMAGE  # only requests with their own keep_alive: none holds
    forever = FixedTTL(float("inf"))
    assert forever.decide(nothing, 1e9).rung is Rung.IMAGE
    assert forever.decide(view(0.0), 1e9).rung is Rung.HOT and forever.decide(view(0.0), 1e9).recheck_at == math.inf


def test_ttl_climbs_nothing():
    """A model below HOT (moved down for memory, or its worker crashed) waits for a request:
    a fixed timeout never pre-warms."""
    p = FixedTTL(300.0, park_s=5.0)
    assert p.decide(view(0.0, rung=Rung.IMAGE), 1.0).rung is Rung.IMAGE
    assert p.decide(view(0.0, rung=Rung.ZERO), 1.0).rung is Rung.ZERO
    assert p.decide(view(0.0, rung=Rung.PARKED), 1.0).rung is Rung.PARKED
    assert all(p.decide(view(0.0, rung=r), t).prewarm_at is None for r in (Rung.IMAGE, Rung.ZERO) for t in (1.0, 9.0))
