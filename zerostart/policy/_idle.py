"""Per-model idle periods from arrivals and completions.

An idle time is the time from the completion that left a model with nothing in flight to the
next arrival (Serverless in the Wild's "IT"). Arrivals while requests are in flight end no
idle period and give no sample.
"""

from __future__ import annotations

from collections import deque


class IdleLog:
    """One model's in-flight count and its recent idle times."""

    __slots__ = ("inflight", "idle_since", "recent", "recent_sum", "count")

    def __init__(self, window: int) -> None:
        self.inflight = 0
        self.idle_since: float | None = None  # None until the first completion
        self.recent: deque[float] = deque(maxlen=window)  # newest last
        self.recent_sum = 0.0  # sum of ``recent``
        self.count = 0  # idle samples seen in total (the window keeps the newest)

    def mean(self) -> float:
        """Mean of the idle times in the window (0 before the first)."""
        return self.recent_sum / len(self.recent) if self.recent else 0.0

    def arrive(self, t: float) -> float | None:
        """Record an arrival; return the idle time it ended, if it ended one."""
        gap = None
        if self.inflight == 0 and self.idle_since is not None:
            gap = t - self.idle_since
            if gap < 0.0:  # out-of-order observations: count it as back-to-back
                gap = 0.0
            if len(self.recent) == self.recent.maxlen:
                self.recent_sum -= self.recent[0]
            self.recent.append(gap)
            self.recent_sum += gap
            self.count += 1
        self.inflight += 1
        return gap

    def complete(self, t: float) -> None:
        # A completion with nothing in flight (a caller restarted mid-request) is an idle start.
        if self.inflight > 0:
            self.inflight -= 1
        if self.inflight == 0:
            self.idle_since = t


class IdleBook:
    """Idle logs for every model a policy has seen."""

    __slots__ = ("window", "logs")

    def __init__(self, window: int) -> None:
        self.window = window
        self.logs: dict[str, IdleLog] = {}

    def log(self, model: str) -> IdleLog:
        log = self.logs.get(model)
        if log is None:
            log = self.logs[model] = IdleLog(self.window)
        return log
