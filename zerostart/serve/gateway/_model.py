"""One served model as the fleet sees it: its replicas, the requests waiting for it, its
keep-alive policy and history, and the decisions that concern it alone (how many replicas it
keeps whatever the traffic, when an idle replica parks or stops). Its policy decides those
(``zerostart.policy``, the code the simulator runs); without a ``keep_alive_policy`` it is the
fixed timeout ``ttl:<idle_timeout>[,park=<park_after>]``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from zerostart.names import LADDER, Climb, Rung
from zerostart.policy import Decision, FixedTTL, ModelView, Policy, make
from zerostart.serve._config import ModelConfig
from zerostart.serve.backends import backend_class
from zerostart.serve.gateway import _prewarm
from zerostart.serve.gateway._replica import Replica
from zerostart.serve.gateway._state import ALIVE, WARM, State, model_state

if TYPE_CHECKING:
    from zerostart.serve.control import ImageReport
    from zerostart.telemetry import Timeline

log = logging.getLogger("zerostart.serve")


def policy_for(cfg: ModelConfig) -> Policy:
    """The model's keep-alive policy: its ``keep_alive_policy`` (``PolicyError``, a ValueError,
    naming what is wrong), else the fixed timeout its ``idle_timeout`` and ``park_after`` say."""
    if cfg.keep_alive_policy is None:
        return FixedTTL(cfg.idle_timeout, park_s=cfg.park_after)
    return make(cfg.keep_alive_policy)


@dataclass
class Waiter:
    """A request held until a replica has room for it."""

    future: asyncio.Future[tuple[Replica, int]]  # the replica handed over and the ticket it gave
    arrived: float  # monotonic


class Model:
    """One served model: its config, replicas, queue and history. The fleet mutates it; the
    methods here only read it (except :meth:`floor`, which remembers a pre-warm it acted on)."""

    def __init__(self, cfg: ModelConfig, estimate: int | None, policy: Policy, *, share: int | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.served_name
        self.estimate = estimate  # device bytes per replica; None: unknown until a worker reports its size
        # where the estimate came from: memory_estimate (config), the checkpoint's headers, the
        # device share, or a replica's measurement (measured)
        self.estimate_source: str | None = ("config" if cfg.memory_estimate is not None else None if estimate is None
                                            else "headers" if cfg.backend == "zerostart" else "share")
        self.share = share  # device bytes one replica may hold (engines are sized from it); None: engine default
        # rungs this model's engine cannot rest on, and why (policies skip them; status shows them)
        self.missing_rungs: dict[Rung, str] = backend_class(cfg.backend).missing_rungs(cfg)
        self.policy = policy  # its keep_alive_policy, else FixedTTL(idle_timeout, park_s=park_after)
        self.parkable = cfg.parkable if cfg.parkable is not None else (
            cfg.park_after is not None or Rung.PARKED in policy.rungs)
        self.park_refused: str | None = self.missing_rungs.get(Rung.PARKED)  # cannot park: idle replicas stop instead
        self.replicas: list[Replica] = []
        self.waiters: deque[Waiter] = deque()
        self.start_task: asyncio.Task[None] | None = None  # the one climb (start or wake) in progress, if any
        self.climbing: Literal["wake", "start"] = "start"  # what start_task does
        self.start_began = 0.0
        self.last_active = -math.inf  # last arrival or completion (monotonic)
        self.max_model_len = cfg.max_model_len  # the context it serves: configured, else what a replica reported
        self.failures = 0  # consecutive failed starts
        self.backoff_until = 0.0
        self.last_error: str | None = None
        self.last_cold_start: Replica | None = None
        self.last_cold_s: float | None = None  # the latest cold start (any rung), until ready
        self.last_ready_s: float | None = None  # spawn -> ready of the last start from source or image
        self.last_wake_s: float | None = None  # the last wake from parked, until ready
        self.starts_s: deque[float] = deque(maxlen=8)  # spawn -> ready of its recent starts (source or image)
        self.has_image = False  # a start used or queued a ready image: the next one restores it
        self.prewarmed_for: float | None = None  # the policy prewarm_at already acted on
        self.prewarm_due: float | None = None  # the policy prewarm_at the floor asks a climb for
        self.evicted_at: float | None = None  # when the fleet last moved it down to make room for another
        self.floor_reason = ""  # why the floor asks for a replica (logged when that starts a climb)
        self.climb_ahead = False  # the current (or last) climb began with no request waiting for it

    def live(self) -> list[Replica]:
        """Replicas with a worker that is, or will be, usable (counted against max_replicas)."""
        return [r for r in self.replicas if r.state in ALIVE]

    def warm(self) -> list[Replica]:
        """Replicas holding the model on its device, or about to (starting, hot, waking)."""
        return [r for r in self.replicas if r.state in WARM]

    def parked(self) -> list[Replica]:
        return [r for r in self.replicas if r.state is State.PARKED]

    @property
    def can_park(self) -> bool:
        return self.parkable and self.park_refused is None

    def parked_bytes(self, r: Replica) -> int:
        """Device bytes a parked replica still holds: none on an accelerator (its weights went
        to host RAM); on CPU, host RAM is the device, so its weights stay counted."""
        if r.memory is not None:  # as measured by its backend
            return min(r.memory.parked_bytes, r.reserved_bytes)
        if self.cfg.device != "cpu":
            return 0
        return max(0, r.reserved_bytes - (self.cfg.kv_cache_bytes or 0))

    def free_replica(self) -> Replica | None:
        ready = [r for r in self.replicas if r.has_capacity]
        return min(ready, key=lambda r: r.in_flight, default=None)

    @property
    def state(self) -> State:
        return model_state(r.state for r in self.replicas)

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    # -- decisions --------------------------------------------------------------------------

    def floor(self, now: float, wall: datetime | None = None) -> int:
        """Replicas kept whatever the traffic: min_replicas; one while a pre-warm window is
        open; one when the policy wants the idle model hot or asks to pre-warm it (once per
        predicted arrival: the climb that begins for it uses it up). Not the policy's wish for a
        model the fleet moved down to make room since its last request: climbing it back would
        only move another down (the simulator does the same). Asked as often as needed (the
        ticker, the climb, memory admission), it gives the same answer until something changes."""
        floor = self.cfg.min_replicas
        self.floor_reason = "min_replicas"
        self.prewarm_due = None
        if floor == 0 and self.cfg.prewarm and _prewarm.is_open(self.cfg.prewarm, wall or datetime.now().astimezone()):
            floor, self.floor_reason = 1, "a pre-warm window is open"
        busy = self.in_flight or self.waiters or self.start_task is not None  # requests climb it anyway
        if (floor == 0 and not self.held(now) and not self.warm() and not busy
                and (self.evicted_at is None or self.evicted_at < self.last_active)):
            d = self.decide(now)
            if d.rung is Rung.HOT:  # the policy wants it hot now: climb
                floor = 1
            elif d.prewarm_at is not None and d.prewarm_at <= now and d.prewarm_at != self.prewarmed_for:
                self.prewarm_due = d.prewarm_at  # used up by the climb that begins for it (climb_began)
                floor = 1
            if floor:
                self.floor_reason = f"policy {self.policy.name}: {d.reason or 'hot'}"
        return floor

    def restart_s(self) -> float:
        """What starting it again costs: the median of its recent starts (one start on a busy
        machine can take several times another), inf before the first."""
        return statistics.median(self.starts_s) if self.starts_s else math.inf

    def climb_began(self, how: Literal["wake", "start"], now: float) -> None:
        """A climb (``how``) began: whether anyone waits for it, and the pre-warm it serves."""
        self.start_began, self.climbing = now, how
        self.climb_ahead = not self.waiters
        if self.prewarm_due is not None:
            self.prewarmed_for = self.prewarm_due  # one climb per predicted arrival

    def next_climb(self, now: float) -> Literal["wake", "start"] | None:
        """Whether a replica should climb now, and how: when requests wait and no warm replica
        has room, or fewer replicas are warm than the floor. ``wake`` a parked replica if there
        is one; else ``start`` one, but not while a replica parks (it wakes once parked), during
        a back-off, or past max_replicas. None while a climb is under way (one at a time)."""
        if self.start_task is not None:
            return None
        warm = self.warm()
        needed = bool(self.waiters) and not any(r.has_capacity for r in warm)
        if not needed and len(warm) >= self.floor(now):
            return None
        if self.parked():
            return "wake"
        if any(r.state is State.PARKING for r in self.replicas):
            return None
        if self.backoff_until > now or len(self.live()) >= self.cfg.max_replicas:
            return None
        return "start"

    def held(self, now: float) -> bool:
        """Whether a request's explicit keep_alive still holds a replica (the policy waits)."""
        return any(r.explicit_until > now for r in self.replicas)

    def next_move(self, r: Replica, now: float) -> tuple[float, str]:
        """When an idle replica (hot or parked) should move down, and how: ``(time, "park")``,
        ``(time, "stop")``, or ``(time, "stay")`` (look again then; inf: only an event can
        change it). The policy decides, replica by replica (:meth:`view`); a request's explicit
        keep_alive holds the replica against it until the keep_alive runs out (``park_after``
        still parks it meanwhile)."""
        view = self.view(r)
        if r.explicit_until > now:
            if r.state is State.HOT and self.can_park and self.cfg.park_after is not None:
                park_at = view.last_active + self.cfg.park_after
                if park_at < r.explicit_until:
                    return park_at, "park"
            return r.explicit_until, "stay"
        d = self.policy.decide(view, now)
        later = d.recheck_at if d.recheck_at is not None else math.inf
        if d.rung is Rung.HOT:
            return later, "stay"
        if d.rung is Rung.PARKED:
            if r.state is State.PARKED:
                return later, "stay"
            return now, "park" if self.can_park else "stop"
        return now, "stop"  # image or zero: the worker goes (its ready image stays on disk)

    def decide(self, now: float) -> Decision:
        """The policy's decision for the model as a whole now (its floor: climb ahead of requests?)."""
        return self.policy.decide(self.view(), now)

    def view(self, r: Replica | None = None) -> ModelView:
        """What the policy is told: about the model (its warmest replica, any request), or about
        one idle replica ``r`` (its rung, requests and keep-alive holds: replicas go down one
        by one). A replica that has served nobody since a climb ahead of requests is as idle as
        its model (a pre-warm is not traffic)."""
        rungs = tuple(x for x in LADDER if x not in self.missing_rungs and (x is not Rung.PARKED or self.can_park))
        if r is None:
            return ModelView(name=self.name, rung=self.rung(),
                             busy=bool(self.in_flight or self.waiters or self.start_task is not None),
                             last_active=self.last_active, size_bytes=self.estimate or 0, rungs=rungs)
        return ModelView(name=self.name, rung=Rung.PARKED if r.state in (State.PARKING, State.PARKED) else Rung.HOT,
                         busy=r.in_flight > 0, last_active=self.last_active if r.ahead else r.last_active,
                         size_bytes=self.estimate or 0, rungs=rungs, timeout_from=r.timeout_from)

    # -- what is going on -------------------------------------------------------------------

    def rung(self) -> Rung:
        """Where it rests on the cold ladder now: HOT while a replica holds it on its device (or
        climbs to), PARKED while one is parked (or parking), else IMAGE once a start used or
        wrote a ready image, else ZERO."""
        if self.warm():
            return Rung.HOT
        if any(r.state in (State.PARKING, State.PARKED) for r in self.replicas):
            return Rung.PARKED
        return Rung.IMAGE if self.has_image else Rung.ZERO

    def status(self, now: float, requests: int = 0, cold_starts: int = 0) -> dict[str, Any]:
        """This model's entry in ``GET /zerostart/status`` (``serve._status.ModelStatus``);
        ``requests`` and ``cold_starts``: its counts since the gateway started."""
        return {
            "name": self.name,
            "state": self.state.value,
            "rung": self.rung(),
            "replicas": len(self.replicas),
            "queued": len(self.waiters),
            "in_flight": self.in_flight,
            "device": self.cfg.device,
            "backend": self.cfg.backend,
            "memory_bytes": sum(r.reserved_bytes for r in self.replicas),
            "memory_estimate_bytes": self.estimate,
            "memory_estimate_source": self.estimate_source,
            "memory_share_bytes": self.share,
            "unavailable_rungs": self.unavailable_rungs(),
            "keep_alive_policy": self.policy.name,
            "keep_alive_s": None if math.isinf(self.cfg.idle_timeout) else self.cfg.idle_timeout,
            "park_after_s": self.cfg.park_after, "parkable": self.can_park, "images": self.cfg.images,
            "last_cold_start": self._cold_start_json(),
            "restart_s": None if math.isinf(restart := self.restart_s()) else round(restart, 3),
            "last_error": self.last_error,
            "backoff_s": round(max(0.0, self.backoff_until - now), 3),
            "oldest_in_flight_s": round(max((r.oldest_request_s(now) for r in self.replicas), default=0.0), 3),
            "requests": requests, "cold_starts": cold_starts,
            "workers": [{"pid": r.pid, "state": r.state.value, "rung": r.climb, "address": r.address,
                         "memory_bytes": r.reserved_bytes,
                         "in_flight": r.in_flight, "oldest_in_flight_s": round(r.oldest_request_s(now), 3),
                         "idle_s": round(now - r.last_active, 3) if r.state in (State.HOT, State.PARKED)
                         and not r.in_flight else 0.0,
                         "kept_for_s": None if math.isinf(r.hold_until) else round(max(0.0, r.hold_until - now), 3),
                         "kv": r.kv.to_json() if r.kv is not None else None,
                         **({"engine_metrics": em} if (em := r.worker.engine_metrics()) else {})}
                        for r in self.replicas],
        }

    def unavailable_rungs(self) -> dict[Rung, str]:
        """The rungs this model cannot rest on, and why: its engine's, and parking refused by a
        worker (or not asked for: ``parkable`` false)."""
        out = dict(self.missing_rungs)
        if Rung.PARKED not in out:
            if self.park_refused is not None:
                out[Rung.PARKED] = self.park_refused
            elif not self.parkable:
                out[Rung.PARKED] = "not parkable: set park_after, parkable: true, or a policy that parks"
        return out

    def _cold_start_json(self) -> dict[str, Any] | None:
        r = self.last_cold_start
        if r is None:
            return None
        standby = r.standby_record if r.climb.standby else None  # the spare's own start, paid before
        return cold_start_json(r.climb, self.last_cold_s or 0.0, r.timeline, r.image, standby)


def cold_start_json(climb: Climb, ready_s: float, timeline: Timeline, image: ImageReport | None = None,
                    standby: dict[str, Any] | None = None) -> dict[str, Any]:
    """A cold start as ``serve._status.ColdStart`` has it."""
    d = timeline.to_dict()
    d.pop("label", None)
    return {"rung": climb, "ready_s": round(ready_s, 6), **d, "image": image.to_json() if image is not None else None,
            "standby": standby}
