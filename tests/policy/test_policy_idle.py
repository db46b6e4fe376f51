import pytest

from zerostart.policy._idle import IdleBook, IdleLog


def test_idle_times_are_gaps_between_idle_starts_and_arrivals():
    log = IdleLog(window=3)
    assert log.arrive(0.0) is None and log.mean() == 0.0  # nothing completed yet
    log.complete(1.0)
    assert log.arrive(4.0) == 3.0
    assert log.arrive(4.5) is None  # busy: no sample
    log.complete(5.0)
    log.complete(6.0)
    assert log.arrive(16.0) == 10.0
    log.complete(17.0)
    assert log.arrive(16.5) == 0.0  # out of order: back-to-back, not negative
    assert log.count == 3 and log.mean() == pytest.approx(13.0 / 3)


def test_the_window_keeps_the_newest_and_its_sum():
    log = IdleLog(window=2)
    t = 0.0
    for gap in (1.0, 2.0, 4.0):
        log.complete(t)
        t += gap
        log.arrive(t)
    assert list(log.recent) == [2.0, 4.0] and log.recent_sum == 6.0 and log.count == 3


def test_a_completion_without_an_arrival_starts_idleness():
    log = IdleLog(window=4)
    log.complete(10.0)
    assert log.inflight == 0 and log.idle_since == 10.0
    book = IdleBook(window=4)
    assert book.log("a") is book.log("a") and book.log("a") is not book.log("b")
