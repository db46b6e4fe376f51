"""zerostart's cost-aware ladder: per model, the rung schedule with the least expected cost.

After a model goes idle, what happens next costs money two ways: holding a rung costs its
price per second (HOT: a device, PARKED: host RAM, IMAGE: disk), and the request that ends the
idle period waits for the climb from wherever the model rests (valued at ``latency_usd_per_s``
per second, plus the device held while loading). With X the coming idle time,

    cost(schedule) = E[ sum over rungs r of  price_r * (time spent on r before X) ]
                   + E[ wake_cost(rung at X) ] + sum of pre-warm climbs taken before X

Two ways to pick the schedule:

* **break-even** (fewer than ``min_samples`` idle times seen): the lower envelope of the lines
  ``wake_cost_r + price_r * x``; the model steps HOT -> PARKED -> IMAGE -> ZERO where each
  lower rung starts to win. It needs no forecast and never costs more than twice the best
  schedule chosen in hindsight (deterministic ski rental).
* **learned**: dynamic programming over a log-spaced time grid against the model's own idle
  times (the last ``window``), mixed with a prior worth ``pool_weight`` samples: the shape of the
  whole fleet's idle times (each divided by its model's mean) rescaled to this model's mean, so a
  model with few samples borrows the fleet's experience of how long idleness lasts (empirical
  Bayes); before the fleet has data, a log-uniform prior on [1 s, horizon] instead. The state is (grid interval, rung); each step may stay, move down
  for free, or pre-warm to HOT for the device time the climb holds. Pre-warm is what a periodic
  model gets: rest low, climb just before the next request is due.

With a ``p99_target_s`` the constraint is "at most 1% of requests wait longer than the
target", so the latency term becomes a penalty per *slow* wake (a rung whose climb exceeds the
target), a Lagrange multiplier: wakes within the target cost only the device time they hold.
The policy watches how many arrivals its own plans put on a slow rung and doubles (or halves)
the penalty until fewer than about 1% do. A constant value per second could not do this: to
keep requests off slow rungs it would also have to keep models HOT longer to avoid fast wakes.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence

import numpy as np

from zerostart.policy._base import LADDER, Decision, ModelView, PolicyError, Rung
from zerostart.policy._costs import CostModel
from zerostart.policy._idle import IdleBook, IdleLog

_BUSY = Decision(Rung.HOT, reason="busy")
_PRIOR_FLOOR_S = 1.0  # the log-uniform prior spans [1 s, horizon]
_POOL_SIZE = 4096  # normalized idle times the fleet keeps
_POOL_MIN = 256  # needed before the pool replaces the log-uniform prior
_POOL_REFRESH = 256  # new pool entries between recomputing its quantiles
_POOL_QUANTILES = 65
_QUANTILE_POINTS = 17  # empirical quantiles added to the grid (every 1/16)
_PLANS_KEPT = 6  # plans kept per model for recent penalty levels
_TIME_EPS = 1e-6  # seconds: far below the grid's resolution, far above float rounding of trace times


class _Plan:
    """A solved schedule: rung choice per (grid interval, incoming rung level)."""

    __slots__ = ("grid", "choice", "nxt", "path", "wake", "kind", "key", "refresh_at")

    def __init__(self, grid, choice, nxt, path, wake, kind, key) -> None:
        self.grid: list[float] = grid  # interval k is [grid[k], grid[k+1]); the last is open
        self.choice: list[list[int]] = choice  # choice[k][level in] -> level to rest on in k
        self.nxt: list[list[int | None]] = nxt  # nxt[k][level in] -> next grid index where it changes
        self.path: list[int] = path  # levels along the schedule that starts HOT at idle start
        self.wake: list[float] = wake  # wake seconds per level
        self.kind = kind  # "break-even" or "learned"
        self.key = key  # (size_bytes, penalty level) it was solved for
        self.refresh_at = 0  # re-solve once the model has this many idle samples


class CostAwareLadder:
    def __init__(self, costs: CostModel | None = None, *, latency_usd_per_s: float | None = None,
                 p99_target_s: float | None = None, min_samples: int = 8, window: int = 256,
                 prewarm: bool = True, rungs: tuple[Rung, ...] = LADDER, horizon_s: float = 7 * 86400.0,
                 grid_growth: float = 1.25, prior_weight: float = 1.0, pool_weight: float = 16.0,
                 control_every: int = 500,
                 control_memory: int = 20000, control_high: float = 0.005, control_low: float = 0.0025,
                 start_level: int = 6,
                 name: str = "ladder") -> None:
        self.costs = costs or CostModel()
        target = self.costs.p99_target_s if p99_target_s is None else p99_target_s
        if target is not None and not target >= 0:
            raise PolicyError(f"ladder: p99 target must be a non-negative number of seconds, got {target!r}")
        if latency_usd_per_s is not None:
            lam = latency_usd_per_s
        else:  # with a target, wakes within it cost only their device time unless told otherwise
            lam = 0.0 if target is not None else self.costs.latency_usd_per_s
        if not (lam >= 0 and math.isfinite(lam)):
            raise PolicyError(f"ladder: latency value must be a non-negative number of $/s, got {lam!r}")
        if min_samples < 1 or window < 2 or not grid_growth > 1 or horizon_s <= 10 or prior_weight < 0:
            raise PolicyError("ladder: need min_samples >= 1, window >= 2, grid_growth > 1, horizon > 10 s, "
                              "prior_weight >= 0")
        if Rung.HOT not in rungs:
            raise PolicyError("ladder: the rungs must include hot")
        self.rungs = tuple(r for r in LADDER if r in rungs)
        self.name = name
        self.latency_usd_per_s = lam
        self.p99_target_s = target
        # penalty per slow wake = base * 2**level; starts at two minutes of device time
        self._penalty_base = 120.0 * self.costs.hold_usd_per_s(Rung.HOT)
        self.min_samples, self.window, self.prewarm = min_samples, window, prewarm
        self.horizon_s, self.prior_weight, self.control_every = horizon_s, prior_weight, control_every
        self.pool_weight = pool_weight
        # The fleet's idle times, each divided by its model's mean idle time before it: the shape
        # of idleness that a model with few samples borrows, rescaled to its own mean.
        self._pool: deque[float] = deque(maxlen=_POOL_SIZE)
        self._pool_added = 0
        self._pool_shape: np.ndarray | None = None
        self.control_memory, self.control_high, self.control_low = control_memory, control_high, control_low
        self._allowed = [r in self.rungs for r in LADDER]
        self._grid = _log_grid(horizon_s, grid_growth)
        self._grid_np = np.asarray(self._grid)
        self._quantile_index: dict[int, np.ndarray] = {}  # sample count -> indices of its quantiles
        self._book = IdleBook(window)
        self._plans: dict[str, dict[tuple, _Plan]] = {}  # model -> (size, level) -> plan
        self._current: dict[str, _Plan] = {}  # model -> the plan its last decision used
        # Idle times are measured from the completion that leaves a model idle, and a climb the
        # policy caused delays that completion: a model kept low would seem to come back sooner
        # than its arrivals do. _burst holds, for the burst in progress, when its climb should
        # end and its latest arrival; _shift what was subtracted from the current idle start.
        self._burst: dict[str, list[float]] = {}
        self._shift: dict[str, float] = {}
        self._level = start_level  # steers the slow-wake penalty (only with a p99 target)
        self._arrivals = 0
        self._slow_n = 0.0
        self._all_n = 0.0
        self._fade = 1.0 - 1.0 / control_memory

    @property
    def slow_wake_usd(self) -> float:
        """The current penalty per wake slower than the p99 target (0 without a target)."""
        return 0.0 if self.p99_target_s is None else self._penalty_base * (2.0 ** self._level)

    # -- observations -------------------------------------------------------------------

    def observe_arrival(self, model: str, t: float) -> None:
        log = self._book.log(model)
        mean = log.mean()
        gap = log.arrive(t)
        if gap is None:
            burst = self._burst.get(model)
            if burst is not None:
                burst[1] = t  # the latest arrival of the burst in progress
            if self.p99_target_s is not None:
                self._control(0.0)
            return
        if mean > 0.0 and log.count > 2:
            self._pool.append(gap / mean)
            self._pool_added += 1
            if self._pool_added % _POOL_REFRESH == 0 and len(self._pool) >= _POOL_MIN:
                self._pool_shape = np.quantile(np.fromiter(self._pool, dtype=np.float64, count=len(self._pool)),
                                               np.linspace(0.0, 1.0, _POOL_QUANTILES))
        # The rung this model's plan had it on when the request came: its climb delays this
        # burst's completion, which would make the next idle time look that much shorter.
        plan = self._current.get(model)
        wake = plan.wake[plan.path[max(0, bisect_right(plan.grid, gap) - 1)]] if plan is not None else 0.0
        self._burst[model] = [t + wake, t]  # [expected end of the climb, latest arrival]
        if self.p99_target_s is not None:
            self._control(1.0 if wake > self.p99_target_s else 0.0)

    def _control(self, slow: float) -> None:
        # Slow and total arrivals, fading over about `control_memory` arrivals: the share of slow
        # ones is what the p99 over that memory will see, overshoot and slack included.
        keep = self._fade
        self._slow_n = self._slow_n * keep + slow
        self._all_n = self._all_n * keep + 1.0
        self._arrivals += 1
        if self._arrivals >= self.control_every:
            self._arrivals = 0
            share = self._slow_n / self._all_n
            # Aim at half the 1% a p99 allows: requests that arrive during a slow climb wait too,
            # and this count only sees the arrivals that start climbs. Up fast, down slowly, and
            # not below two minutes of device time per slow wake: an overshoot costs host RAM, a
            # miss costs the target.
            if share > self.control_high:
                self._level = min(self._level + 2, 40)
            elif share < self.control_low:
                self._level = max(self._level - 1, 0)

    def observe_completion(self, model: str, t: float) -> None:
        log = self._book.log(model)
        log.complete(t)
        if log.inflight == 0:
            # Learn idle times as if nothing had waited for a climb: they then depend on the
            # arrivals alone, not on which rungs this policy chose. The burst's last request
            # waited for what was left of the climb when it came (nothing if it came later).
            # (The plan's rung is what the model should have been on; if it was higher, the
            # completion came sooner, and the idle start never moves before the last arrival.)
            burst = self._burst.pop(model, None)
            shift = 0.0
            if burst is not None:
                ready, last = burst
                shift = max(0.0, min(ready - last, t - last))
            self._shift[model] = shift
            log.idle_since = t - shift

    # -- decisions ----------------------------------------------------------------------

    def decide(self, view: ModelView, now: float) -> Decision:
        if view.busy:
            return _BUSY
        plan = self.plan(view.name, view.size_bytes, view.rungs)
        t0 = view.last_active - self._shift.get(view.name, 0.0)  # on the delay-free clock
        # A recheck scheduled at t0 + grid[j] may compute now - t0 a hair below grid[j]: the
        # tolerance keeps that from answering "stay until now" forever.
        k = bisect_right(plan.grid, now - t0 + _TIME_EPS) - 1
        if k < 0:
            k = 0
        level_in = view.rung.level
        level = plan.choice[k][level_in]
        j = plan.nxt[k][level_in]
        if j is None:
            return Decision(LADDER[level], reason=f"{plan.kind}: rest")
        at = t0 + plan.grid[j]
        if plan.choice[j][level] == 0 and level != 0:
            start = at - plan.wake[level]
            if start <= now:
                return Decision(Rung.HOT, reason=f"{plan.kind}: pre-warm now")
            return Decision(LADDER[level], prewarm_at=start, recheck_at=start, reason=f"{plan.kind}: pre-warm later")
        return Decision(LADDER[level], recheck_at=at, reason=f"{plan.kind}: rest until the next step")

    def plan(self, model: str, size_bytes: int = 0, rungs: tuple[Rung, ...] = LADDER) -> _Plan:
        """The schedule for ``model`` as of the observations so far (solved lazily, cached),
        over this policy's rungs that the model's engine also has (``rungs``)."""
        allowed = tuple(a and (r in rungs or r is Rung.ZERO) for a, r in zip(self._allowed, LADDER))
        key = (size_bytes, self._level, allowed)
        plans = self._plans.get(model)
        if plans is None:
            plans = self._plans[model] = {}
        plan = plans.get(key)
        log = self._book.log(model)
        if plan is not None and log.count < plan.refresh_at:
            self._current[model] = plan
            return plan
        plan = self._solve(model, log, size_bytes, key, allowed)
        # The penalty level moves up and down within a few steps: keep the latest few plans.
        plans.pop(key, None)
        if len(plans) >= _PLANS_KEPT:
            del plans[next(iter(plans))]
        plans[key] = plan
        self._current[model] = plan
        return plan

    # -- solving ------------------------------------------------------------------------

    def _prices(self, model: str, size_bytes: int) -> tuple[list[float], list[float], list[float], list[float]]:
        costs, lam = self.costs, self.latency_usd_per_s
        hot = costs.hold_usd_per_s(Rung.HOT, size_bytes)
        hold = [costs.hold_usd_per_s(r, size_bytes) for r in LADDER]
        wake_s = [costs.wake_s(r, size_bytes, model) for r in LADDER]
        wake_usd = [s * (lam + hot) for s in wake_s]
        if self.p99_target_s is not None:
            penalty, target = self.slow_wake_usd, self.p99_target_s
            wake_usd = [w + (penalty if s > target else 0.0) for w, s in zip(wake_usd, wake_s)]
        climb_usd = [s * hot for s in wake_s]  # device time a pre-warm holds, nobody waiting
        return hold, wake_s, wake_usd, climb_usd

    def _solve(self, model: str, log: IdleLog, size_bytes: int, key, allowed: tuple[bool, ...]) -> _Plan:
        hold, wake_s, wake_usd, climb_usd = self._prices(model, size_bytes)
        n = log.count
        if n < self.min_samples:
            plan = self._break_even(hold, wake_s, wake_usd, key, allowed)
            plan.refresh_at = self.min_samples  # it does not depend on the samples before then
        else:
            plan = self._learned(log.recent, hold, wake_s, wake_usd, climb_usd, key, allowed)
            # Re-solve after a quarter more samples (geometric: a few dozen solves per model
            # to fill the window), then every half window.
            plan.refresh_at = n + max(1, min(n // 4, self.window // 2))
        return plan

    def _break_even(self, hold, wake_s, wake_usd, key, allowed) -> _Plan:
        # Lower envelope of cost_r(x) = wake_r + hold_r * x over the allowed rungs, from HOT.
        steps = [(0.0, 0)]
        cur, x = 0, 0.0
        while True:
            best = None
            for r in range(cur + 1, 4):
                if not allowed[r] or hold[r] >= hold[cur]:
                    continue
                cross = max(x, (wake_usd[r] - wake_usd[cur]) / (hold[cur] - hold[r]))
                if best is None or cross < best[0] or (cross == best[0] and hold[r] < hold[best[1]]):
                    best = (cross, r)
            if best is None or not math.isfinite(best[0]):
                break
            x, cur = best
            if steps[-1][0] == x:
                steps[-1] = (x, cur)
            else:
                steps.append((x, cur))
        grid = [s for s, _ in steps]
        env = [r for _, r in steps]
        choice = [[max(e, r_in) for r_in in range(4)] for e in env]
        return _Plan(grid, choice, _next_changes(choice), env, wake_s, "break-even", key)

    def _learned(self, recent, hold, wake_s, wake_usd, climb_usd, key, allowed) -> _Plan:
        grid, mass, time_in, surv = self._distribution(recent)
        n_pts = len(grid)
        prewarm = self.prewarm
        h0, h1, h2, h3 = hold
        w0, w1, w2, w3 = wake_usd
        c1, c2, c3 = climb_usd[1], climb_usd[2], climb_usd[3]
        pw1, pw2, pw3 = 2.0 * wake_s[1], 2.0 * wake_s[2], 2.0 * wake_s[3]  # earliest pre-warm ends
        choice: list[list[int]] = [[0] * 4 for _ in range(n_pts)]
        nxt: list[list[int | None]] = [[None] * 4 for _ in range(n_pts)]
        # Terminal (after the last grid point): rest on the rung whose wake costs least times
        # the mass still to come (none under the prior alone), lower rungs on a tie.
        s_last = surv[-1]
        stay = [w0 * s_last, w1 * s_last, w2 * s_last, w3 * s_last]
        values: Sequence[float] = _choose(stay, allowed, choice[-1], 0.0, 0.0, 0.0, False)
        a0, a1, a2, a3 = allowed
        for k in range(n_pts - 2, -1, -1):
            m, ti, sk = mass[k], time_in[k], surv[k]  # P(arrival in interval k), E[time in it], P(X >= start)
            v0, v1, v2, v3 = values
            s0 = h0 * ti + w0 * m + v0
            s1 = h1 * ti + w1 * m + v1
            s2 = h2 * ti + w2 * m + v2
            s3 = h3 * ti + w3 * m + v3
            row = choice[k]
            # From each incoming rung: the cheapest allowed rung at or below it (the lower one
            # on a tie), or stay where the caller put it when no allowed rung lies below...
            if a3:
                b3, r3 = s3, 3
            else:
                b3, r3 = s3, -3
            if a2 and (r3 < 0 or s2 < b3):
                b2, r2 = s2, 2
            else:
                b2, r2 = (b3, r3) if r3 >= 0 else (s2, -2)
            if a1 and (r2 < 0 or s1 < b2):
                b1, r1 = s1, 1
            else:
                b1, r1 = (b2, r2) if r2 >= 0 else (s1, -1)
            if r1 >= 0 and s0 >= b1:
                b0, r0 = b1, r1
            else:
                b0, r0 = s0, 0
            # ...or pre-warm to HOT for the device time the climb holds, if the rest before it
            # lasts at least as long as the climb (a shorter one frees the device for less time
            # than the climb holds it: nobody can use that).
            if prewarm:
                g = grid[k]
                if g >= pw1 and c1 * sk + s0 < b1:
                    b1, r1 = c1 * sk + s0, 0
                if g >= pw2 and c2 * sk + s0 < b2:
                    b2, r2 = c2 * sk + s0, 0
                if g >= pw3 and c3 * sk + s0 < b3:
                    b3, r3 = c3 * sk + s0, 0
            r1, r2, r3 = abs(r1), abs(r2), abs(r3)
            row[0], row[1], row[2], row[3] = r0, r1, r2, r3
            values = (b0, b1, b2, b3)
            nrow, nxt_row, next_choice = nxt[k], nxt[k + 1], choice[k + 1]
            nrow[0] = k + 1 if next_choice[r0] != r0 else nxt_row[r0]
            nrow[1] = k + 1 if next_choice[r1] != r1 else nxt_row[r1]
            nrow[2] = k + 1 if next_choice[r2] != r2 else nxt_row[r2]
            nrow[3] = k + 1 if next_choice[r3] != r3 else nxt_row[r3]
        path, level = [], 0
        for row in choice:
            level = row[level]
            path.append(level)
        return _Plan(grid, choice, nxt, path, wake_s, "learned", key)

    def _distribution(self, recent) -> tuple[list[float], list[float], list[float], list[float]]:
        """The grid for these idle times, and per grid interval P(arrival in it) and E[time spent
        in it], and P(X >= grid[k]), for the empirical idle times mixed with the prior.

        The grid is the log grid plus the empirical quantiles in 1/16 steps: an interval may
        then start exactly where a cluster of idle times starts, which is what a pre-warm for a
        periodic model needs (a log step alone would hold the device up to 25% of the gap early).
        """
        x = np.array(recent, dtype=np.float64)
        x.sort()
        np.minimum(x, self.horizon_s, out=x)
        n = x.shape[0]
        pick = self._quantile_index.get(n)
        if pick is None:
            pick = self._quantile_index[n] = np.linspace(0, n - 1, min(n, _QUANTILE_POINTS)).round().astype(np.intp)
        grid = np.union1d(self._grid_np, x[pick])
        if self._pool_shape is not None and self.pool_weight > 0:
            # the fleet's shape at this model's scale, as equally weighted pseudo-samples
            y = np.minimum(self._pool_shape * (float(x.sum()) / n), self.horizon_s)
            cy = np.searchsorted(y, grid, side="left")
            ny = y.shape[0]
            prior_surv = (ny - cy) / ny
            prior_below = (np.concatenate(([0.0], np.cumsum(y)))[cy] + grid * (ny - cy)) / ny
            weight = self.pool_weight
        else:
            prior_surv, prior_below = _log_uniform(grid, self.horizon_s)
            weight = self.prior_weight
        c = np.searchsorted(x, grid, side="left")  # samples below each grid point
        prefix = np.concatenate(([0.0], np.cumsum(x)))
        beta = weight / (n + weight)
        surv = (1.0 - beta) * (n - c) / n + beta * prior_surv
        below = (1.0 - beta) * (prefix[c] + grid * (n - c)) / n + beta * prior_below  # E[min(X, s)]
        return grid.tolist(), (surv[:-1] - surv[1:]).tolist(), (below[1:] - below[:-1]).tolist(), surv.tolist()


def _choose(stay, allowed, row, climb1, climb2, climb3, prewarm) -> list[float]:
    """Fill ``row[r_in]`` with the best rung from each incoming rung given the cost of staying
    on each; return the values. Options: rest on an allowed rung at or below r_in (the lowest
    wins a tie), stay on r_in if nothing allowed lies at or below it, or pre-warm to HOT."""
    values = [0.0, 0.0, 0.0, 0.0]
    best, arg = math.inf, -1
    for t in (3, 2, 1, 0):
        st = stay[t]
        if allowed[t] and st < best:
            best, arg = st, t
        if arg < 0:
            values[t], row[t] = st, t
        else:
            values[t], row[t] = best, arg
    if prewarm:
        s0 = stay[0]
        for r_in, climb in ((1, climb1), (2, climb2), (3, climb3)):
            v = climb + s0
            if v < values[r_in]:
                values[r_in], row[r_in] = v, 0
    return values


def _log_grid(horizon_s: float, growth: float) -> list[float]:
    grid, s = [0.0], 1.0
    while s < horizon_s:
        grid.append(s)
        s *= growth
    grid.append(horizon_s)
    return grid


def _log_uniform(grid: np.ndarray, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """P(X >= s) and E[min(X, s)] for X log-uniform on [1 s, horizon]."""
    a, span = _PRIOR_FLOOR_S, math.log(horizon / _PRIOR_FLOOR_S)
    s = np.clip(grid, a, horizon)
    log_ratio = np.log(s / a)
    surv = np.where(grid <= a, 1.0, 1.0 - log_ratio / span)
    below = np.where(grid <= a, grid, s - (s * log_ratio - s + a) / span)
    return surv, below


def _next_changes(choice: list[list[int]]) -> list[list[int | None]]:
    """nxt[k][r_in]: the first grid index j > k where the rung changes along the schedule."""
    n = len(choice)
    nxt: list[list[int | None]] = [[None] * 4 for _ in range(n)]
    for k in range(n - 2, -1, -1):
        for r_in in range(4):
            level = choice[k][r_in]
            if choice[k + 1][level] != level:
                nxt[k][r_in] = k + 1
            else:
                nxt[k][r_in] = nxt[k + 1][level]
    return nxt
