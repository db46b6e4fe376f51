import pytest

import zerostart.policy as policy
from zerostart.policy import (AlwaysWarm, CostAwareLadder, CostModel, FixedTTL, HybridHistogram, ModelView,
                              PolicyError, Rung, make)


def test_public_surface_is_pinned():
    assert policy.__all__ == ["LADDER", "POLICY_NAMES", "AlwaysWarm", "Candidate", "CostAwareLadder", "CostModel",
                              "Decision", "FixedTTL", "HybridHistogram", "ModelView", "Policy", "PolicyError", "Rung",
                              "choose_victim", "describe", "make", "usable"]
    assert policy.POLICY_NAMES == ("always", "hybrid", "ladder", "ttl")


def test_policy_package_imports_nothing_else_of_zerostart():
    """Pure: nothing of zerostart but itself and the torch-free leaf (names, units), which
    imports nothing of zerostart either (tests/test_house.py)."""
    import ast
    import pathlib

    allowed = ("zerostart.policy", "zerostart.units", "zerostart.names")
    for path in pathlib.Path(policy.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zerostart"):
                assert node.module.startswith(allowed), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("zerostart") or alias.name.startswith(allowed)


@pytest.mark.parametrize("spec, cls, name", [
    ("always", AlwaysWarm, "always"),
    ("ttl:300", FixedTTL, "ttl:300"),
    (" TTL : 5m , down=parked ", FixedTTL, "ttl:5m,down=parked"),
    ("hybrid", HybridHistogram, "hybrid"),
    ("hybrid:range=2h,bin=30s,cv=1.5,down=zero", HybridHistogram, "hybrid:range=2h,bin=30s,cv=1.5,down=zero"),
    ("ladder", CostAwareLadder, "ladder"),
    ("ladder:p99=1,rungs=hot+image,prewarm=off", CostAwareLadder, "ladder:p99=1,rungs=hot+image,prewarm=off"),
])
def test_make_builds_each_policy(spec, cls, name):
    p = make(spec)
    assert isinstance(p, cls) and p.name == name


def test_make_parses_arguments():
    ttl, ttl_down = make("ttl:5m"), make("ttl:ttl=90,down=zero")
    assert isinstance(ttl, FixedTTL) and isinstance(ttl_down, FixedTTL)
    assert ttl.ttl_s == 300.0
    assert ttl_down.down is Rung.ZERO
    h = make("hybrid:range=2h,bin=30s,min_samples=3,keepalive=10m")
    assert isinstance(h, HybridHistogram)
    assert (h.range_s, h.bin_s, h.min_samples, h.keepalive_s) == (7200.0, 30.0, 3, 600.0)
    lad = make("ladder:p99=1.5,rungs=hot+image,prewarm=off,latency=0.5,window=64")
    assert isinstance(lad, CostAwareLadder)
    assert lad.p99_target_s == 1.5 and lad.rungs == (Rung.HOT, Rung.IMAGE) and lad.prewarm is False
    assert lad.latency_usd_per_s == 0.5 and lad.window == 64
    costs = CostModel(latency_usd_per_s=0.25)
    fed = make("ladder", costs)
    assert isinstance(fed, CostAwareLadder) and fed.latency_usd_per_s == 0.25  # the cost model feeds the ladder


@pytest.mark.parametrize("spec, match", [
    ("", "valid policies: always, hybrid, ladder, ttl"),
    ("lru", r"unknown policy 'lru'.*valid policies: always, hybrid, ladder, ttl"),
    ("ttl", "needs its ttl argument"),
    ("ttl:soon", "bad value 'soon' for 'ttl'"),
    ("ttl:300,wait=1", r"no argument 'wait'.*valid arguments: down, park, ttl"),
    ("ttl:300,400", "takes key=value arguments"),
    ("ttl:300,ttl=400", "given twice"),
    ("ttl:30,down=hot", "must be parked, image or zero"),
    ("always:1", "takes no arguments"),
    ("hybrid:14400", r"takes key=value arguments \(bin, cv, down"),
    ("ladder:rungs=parked+image", "must include hot"),
    ("ladder:prewarm=maybe", "must be on or off"),
    ("hybrid:tail=0.01", "head < tail"),
])
def test_make_errors_name_what_is_wrong(spec, match):
    with pytest.raises(PolicyError, match=match):
        make(spec)


@pytest.mark.parametrize("spec", ["always", "ttl:30", "hybrid", "ladder", "ladder:p99=1"])
def test_every_policy_keeps_busy_models_hot_and_answers_in_the_future(spec):
    p = make(spec)
    t = 0.0
    for i in range(30):
        p.observe_arrival("m", t)
        p.observe_completion("m", t + 1)
        t += 1 + (5 if i % 2 else 700)
    for now in (t, t + 1, t + 100, t + 10_000):
        assert p.decide(ModelView("m", Rung.IMAGE, True, t), now).rung is Rung.HOT
        d = p.decide(ModelView("m", Rung.HOT, False, t), now)
        assert d.rung in p.rungs
        assert d.recheck_at is None or d.recheck_at > now
        assert d.prewarm_at is None or d.prewarm_at > now


def test_describe_documents_every_policy_and_argument():
    text = policy.describe()
    for word in ("always", "ttl:SECONDS", "hybrid", "ladder", "min_samples", "p99=SECONDS", "rungs="):
        assert word in text
