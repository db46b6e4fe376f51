"""Pre-warm windows: cron expressions with durations, in the server's local time.

A window is open from each time its cron expression fires until ``duration`` later; while any
window of a model is open the fleet keeps one replica of it hot (as if ``min_replicas`` were 1).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Sequence

from croniter import croniter

from zerostart.serve._config import PrewarmWindow


def is_open(windows: Sequence[PrewarmWindow], now: datetime) -> bool:
    """Whether any window is open at ``now`` (a timezone-aware datetime)."""
    return any(now < _last_fire(w, now) + timedelta(seconds=w.duration) for w in windows)


def next_change(windows: Sequence[PrewarmWindow], now: datetime) -> datetime | None:
    """The next time a window opens or closes after ``now``; None without windows."""
    times = []
    for w in windows:
        end = _last_fire(w, now) + timedelta(seconds=w.duration)
        if end > now:
            times.append(end)
        times.append(croniter(w.cron, now).get_next(datetime))
    return min(times, default=None)


def _last_fire(window: PrewarmWindow, now: datetime) -> datetime:
    # croniter's get_prev from an exact firing time returns the one before; step a microsecond
    # ahead so a window that fires exactly at `now` counts as open.
    return croniter(window.cron, now + timedelta(microseconds=1)).get_prev(datetime)
