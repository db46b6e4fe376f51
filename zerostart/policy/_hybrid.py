"""Azure's hybrid histogram policy (Shahrad et al., "Serverless in the Wild", USENIX ATC 2020).

Per model, a histogram of idle times in 1-minute bins over 4 hours. After each idle start:

  too few samples (< min_samples)   standard keep-alive: HOT for ``keepalive`` seconds
  most idle times out of range      time-series forecast F of the next idle time:
  (>= oob of them past 4 h)         down now, pre-warm at (1 - ts_margin) F, HOT until (1 + ts_margin) F
  bin counts too flat (CV < cv)     standard keep-alive (the histogram is not representative)
  otherwise                         head H = lower edge of the bin holding the 5th percentile,
                                    tail T = upper edge of the bin holding the 99th percentile;
                                    pre-warm at (1 - margin) H, keep alive until (1 + margin) T;
                                    with a pre-warm > 0 the model goes down at once meanwhile

``min_samples`` is ours: the paper's CV test alone calls one sample representative. The paper
fits ARIMA for the forecast; this uses an AR(1) model of log idle time over the last
``ts_window`` idle times, which needs no fitting library and follows the same recent trend.
"""

from __future__ import annotations

import math

from zerostart.policy._base import Decision, ModelView, PolicyError, Rung, usable
from zerostart.policy._idle import IdleBook

_BUSY = Decision(Rung.HOT, reason="busy")


class _Histogram:
    """Idle-time bin counts, the out-of-range count and a running sum of squared counts."""

    __slots__ = ("bins", "in_range", "oob", "sumsq", "plan")

    def __init__(self, n_bins: int) -> None:
        self.bins = [0] * n_bins
        self.in_range = 0
        self.oob = 0
        self.sumsq = 0  # sum of squared bin counts, for the CV in O(1)
        self.plan: tuple[str, float, float] | None = None  # (branch, prewarm_s, keepalive_until_s)

    def add(self, bin_index: int) -> None:
        if bin_index >= len(self.bins):
            self.oob += 1
            return
        c = self.bins[bin_index]
        self.sumsq += 2 * c + 1  # (c + 1)^2 - c^2
        self.bins[bin_index] = c + 1
        self.in_range += 1

    def cv(self) -> float:
        """Coefficient of variation of the bin counts (population standard deviation / mean)."""
        n = len(self.bins)
        if self.in_range == 0:
            return 0.0
        mean = self.in_range / n
        var = max(0.0, self.sumsq / n - mean * mean)
        return math.sqrt(var) / mean

    def percentile_bin(self, q: float) -> int:
        """Index of the first bin at which the cumulative in-range count reaches ``q``."""
        need = q * self.in_range
        acc = 0
        for i, c in enumerate(self.bins):
            acc += c
            if acc >= need and acc > 0:
                return i
        return len(self.bins) - 1


def forecast_idle(recent: list[float]) -> float:
    """Next idle time by an AR(1) model of log idle time: mean-reverting toward the recent
    geometric mean at the fitted lag-1 autocorrelation (clamped to +-0.95)."""
    if not recent:
        raise PolicyError("forecast_idle needs at least one idle time")
    xs = [math.log(max(x, 1e-3)) for x in recent]
    mu = sum(xs) / len(xs)
    if len(xs) < 3:
        return math.exp(mu)
    den = sum((x - mu) ** 2 for x in xs)
    if den <= 1e-12:
        return math.exp(mu)
    num = sum((a - mu) * (b - mu) for a, b in zip(xs, xs[1:]))
    phi = max(-0.95, min(0.95, num / den))
    return math.exp(mu + phi * (xs[-1] - mu))


class HybridHistogram:
    def __init__(self, *, range_s: float = 4 * 3600.0, bin_s: float = 60.0, head: float = 0.05,
                 tail: float = 0.99, margin: float = 0.10, cv: float = 2.0, min_samples: int = 10,
                 oob: float = 0.5, ts_margin: float = 0.15, ts_window: int = 32,
                 keepalive_s: float | None = None, down: Rung = Rung.IMAGE, name: str = "hybrid") -> None:
        if not (bin_s > 0 and range_s >= bin_s):
            raise PolicyError(f"hybrid: need bin > 0 and range >= bin, got bin={bin_s!r}, range={range_s!r}")
        if not (0 < head < tail <= 1):
            raise PolicyError(f"hybrid: need 0 < head < tail <= 1, got head={head!r}, tail={tail!r}")
        if not (0 <= margin < 1 and 0 <= ts_margin < 1):
            raise PolicyError(f"hybrid: margins must be in [0, 1), got margin={margin!r}, ts_margin={ts_margin!r}")
        if not (0 < oob <= 1) or cv < 0 or min_samples < 1 or ts_window < 1:
            raise PolicyError("hybrid: need 0 < oob <= 1, cv >= 0, min_samples >= 1, ts_window >= 1")
        if down is Rung.HOT:
            raise PolicyError("hybrid: down=hot would never scale down; use the 'always' policy")
        self.range_s, self.bin_s, self.head, self.tail = float(range_s), float(bin_s), head, tail
        self.margin, self.cv_threshold, self.min_samples, self.oob_threshold = margin, cv, min_samples, oob
        self.ts_margin = ts_margin
        self.keepalive_s = self.range_s if keepalive_s is None else float(keepalive_s)
        self.down = down
        self.rungs: tuple[Rung, ...] = (Rung.HOT, down)
        self.name = name
        self._n_bins = int(round(self.range_s / self.bin_s))
        self._book = IdleBook(ts_window)
        self._hists: dict[str, _Histogram] = {}

    # -- observations -------------------------------------------------------------------

    def observe_arrival(self, model: str, t: float) -> None:
        gap = self._book.log(model).arrive(t)
        if gap is not None:
            h = self._hists.get(model)
            if h is None:
                h = self._hists[model] = _Histogram(self._n_bins)
            h.add(int(gap // self.bin_s))
            h.plan = None

    def observe_completion(self, model: str, t: float) -> None:
        self._book.log(model).complete(t)

    # -- decisions ----------------------------------------------------------------------

    def windows(self, model: str) -> tuple[str, float, float]:
        """(branch, pre-warm offset, keep-alive-until offset) in seconds after an idle start.
        A pre-warm offset of 0 means: stay HOT from the idle start."""
        h = self._hists.get(model)
        if h is None:
            return ("too few samples", 0.0, self.keepalive_s)
        if h.plan is None:
            h.plan = self._windows(model, h)
        return h.plan

    def _windows(self, model: str, h: _Histogram) -> tuple[str, float, float]:
        total = h.in_range + h.oob
        if total < self.min_samples:
            return ("too few samples", 0.0, self.keepalive_s)
        if h.oob / total >= self.oob_threshold:
            f = forecast_idle(list(self._book.log(model).recent))
            return ("forecast", (1.0 - self.ts_margin) * f, (1.0 + self.ts_margin) * f)
        if h.cv() < self.cv_threshold:
            return ("not representative", 0.0, self.keepalive_s)
        head_edge = h.percentile_bin(self.head) * self.bin_s  # lower edge, rounded down
        tail_edge = (h.percentile_bin(self.tail) + 1) * self.bin_s  # upper edge, rounded up
        return ("histogram", (1.0 - self.margin) * head_edge, (1.0 + self.margin) * tail_edge)

    def decide(self, view: ModelView, now: float) -> Decision:
        if view.busy:
            return _BUSY
        branch, prewarm, until = self.windows(view.name)
        t0 = view.last_active
        down = usable(self.down, view)  # the next rung below when this model's engine lacks ``down``
        if prewarm > 0.0 and now < t0 + prewarm:
            return Decision(down, prewarm_at=t0 + prewarm, recheck_at=t0 + prewarm,
                            reason=f"{branch}: down until the pre-warm")
        if now < t0 + until:
            return Decision(Rung.HOT, recheck_at=t0 + until, reason=f"{branch}: keep alive")
        return Decision(down, reason=f"{branch}: past the keep-alive window")
