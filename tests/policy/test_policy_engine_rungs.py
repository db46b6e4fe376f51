"""A model whose engine cannot rest on some rungs (vLLM on CPU cannot park; foreign engines
keep no ready image): every policy chooses among the rungs that model has."""

import pytest

from tests.policy._feed import feed
from zerostart.policy import CostAwareLadder, CostModel, FixedTTL, HybridHistogram, ModelView, Rung, usable

NO_PARK = (Rung.HOT, Rung.IMAGE, Rung.ZERO)
FOREIGN_CPU = (Rung.HOT, Rung.ZERO)  # no parking, no ready image


def follow(p, t0, rungs, limit=20):
    out, now, rung = [], t0, Rung.HOT
    for _ in range(limit):
        d = p.decide(ModelView("m", rung, False, t0, rungs=rungs), now)
        out.append(d.rung)
        rung = d.rung
        nxt = d.prewarm_at if d.prewarm_at is not None else d.recheck_at
        if nxt is None:
            return out
        now = nxt
    raise AssertionError(f"no final rung: {out}")


def test_usable_is_the_next_rung_down_the_model_has():
    v = ModelView("m", Rung.HOT, False, 0.0, rungs=FOREIGN_CPU)
    assert usable(Rung.PARKED, v) is Rung.ZERO and usable(Rung.IMAGE, v) is Rung.ZERO
    assert usable(Rung.HOT, v) is Rung.HOT
    v = ModelView("m", Rung.HOT, False, 0.0, rungs=NO_PARK)
    assert usable(Rung.PARKED, v) is Rung.IMAGE
    assert usable(Rung.PARKED, ModelView("m", Rung.HOT, False, 0.0)) is Rung.PARKED  # default: every rung


def test_ttl_falls_past_a_rung_the_engine_lacks():
    p = FixedTTL(60.0, down=Rung.PARKED)
    d = p.decide(ModelView("m", Rung.HOT, False, 0.0, rungs=FOREIGN_CPU), 100.0)
    assert d.rung is Rung.ZERO and "parked is not available" in d.reason
    assert p.decide(ModelView("m", Rung.HOT, False, 0.0), 100.0).rung is Rung.PARKED


def test_hybrid_falls_past_a_rung_the_engine_lacks():
    p = HybridHistogram(down=Rung.PARKED, keepalive_s=30.0)
    assert p.decide(ModelView("m", Rung.HOT, False, 0.0, rungs=NO_PARK), 100.0).rung is Rung.IMAGE


def test_ladder_plans_over_the_rungs_the_model_has():
    p = CostAwareLadder(CostModel())
    assert follow(p, 1000.0, rungs=(Rung.HOT, Rung.PARKED, Rung.IMAGE, Rung.ZERO)) == [
        Rung.HOT, Rung.PARKED, Rung.IMAGE, Rung.ZERO]
    assert follow(p, 1000.0, rungs=NO_PARK) == [Rung.HOT, Rung.IMAGE, Rung.ZERO]
    assert follow(p, 1000.0, rungs=FOREIGN_CPU) == [Rung.HOT, Rung.ZERO]


@pytest.mark.parametrize("gaps", [[5.0] * 40, [3600.0] * 40, [30.0, 900.0] * 20])
def test_learned_ladder_never_rests_a_model_where_it_cannot(gaps):
    p = CostAwareLadder(CostModel())
    t = feed(p, gaps)
    for rung in follow(p, t, rungs=FOREIGN_CPU):
        assert rung in FOREIGN_CPU
