from zerostart.policy import Candidate, choose_victim


def test_the_cheapest_to_bring_back_goes_first():
    # a parked replica (a 0.1 s wake) outranks stopped ones (a 2 s start), whatever their age
    cands = [Candidate("stop-old", 2.0, last_active=1.0), Candidate("park-new", 0.1, last_active=9.0)]
    assert choose_victim(cands) == "park-new"


def test_the_idle_model_cheapest_to_bring_back_goes_first_and_of_equals_the_least_recently_used():
    cands = [Candidate("slow", restart_s=9.0, last_active=1.0), Candidate("fast", 2.0, 5.0),
             Candidate("fast-older", 2.0, 3.0)]
    assert choose_victim(cands) == "fast-older"
    assert choose_victim([]) is None


def test_like_costs_leave_it_to_recency():
    # 2.05 s and 2.11 s are one kind of start measured twice: the least recently used goes
    cands = [Candidate("a", 2.11, last_active=5.0), Candidate("b", 2.05, last_active=7.0),
             Candidate("c", 2.9, last_active=6.0)]
    assert choose_victim(cands) == "a"
    # up to 50 % above the cheapest counts as like; beyond, it does not
    assert choose_victim([Candidate("x", 3.1, 1.0), Candidate("y", 2.0, 2.0)]) == "y"
    assert choose_victim([Candidate("x", 2.9, 1.0), Candidate("y", 2.0, 2.0)]) == "x"
    assert choose_victim(cands, tolerance=0.0) == "b"


def test_no_candidates_and_unknown_costs():
    assert choose_victim([]) is None
    # costs not measured yet (inf) are all alike: recency decides
    assert choose_victim([Candidate("p", float("inf"), 3.0), Candidate("q", float("inf"), 1.0)]) == "q"
    # ties on both: the first given
    assert choose_victim([Candidate("p", 1.0, 1.0), Candidate("q", 1.0, 1.0)]) == "p"
