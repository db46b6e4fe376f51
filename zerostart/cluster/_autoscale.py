"""Replica-level scale-to-zero on Ray Serve, decided by zerostart's policies.

Ray's controller calls a custom autoscaling policy every control-loop tick with the pool's load
(requests queued at handles plus those on replicas, averaged over ``look_back``). This adapter
turns that load into the observations the fleet and the simulator feed the same policy objects
(an arrival when the pool goes from idle to busy, a completion when it goes back) and turns the
policy's rung into a replica count:

  busy                          ceil(load / target_ongoing_requests), at least 1
  idle, policy says HOT/PARKED  1 (the replica stays: its models park inside it)
  idle, policy pre-warms        1
  idle, policy says IMAGE/ZERO  0 (Ray stops the process; the node's ready images stay on disk)

A replica is one process, so PARKED is the replica's models' rung, not the replica's: Ray kills
the process on scale-down and whatever it held in host RAM with it. The ladder inside a replica
is the fleet's (park_after, idle_timeout, keep_alive_policy per model).

From zero Ray starts the first replica itself, before asking any policy (a request at zero
climbs regardless of policy, as on one machine). Ray's own delays (upscale_delay_s,
downscale_delay_s, downscale_to_zero_delay_s) are set to 0 by the deployment, so the count
returned here is applied at once (Ray still steps N -> 1 -> 0).

Ray pickles this module by value into its controller; it imports only ``zerostart.policy``.
"""

from __future__ import annotations

import math
from typing import Any

from zerostart.policy import ModelView, Rung, make

_KEEPS_REPLICA = (Rung.HOT, Rung.PARKED)


class ReplicaPolicy:
    """A Ray Serve autoscaling policy (``policy_function`` with ``policy_kwargs``) for one pool."""

    def __init__(self, policy: str, pool: str, target_ongoing_requests: float) -> None:
        self.policy = make(policy)  # a zerostart.policy Policy; PolicyError names a bad spec
        self.pool = pool
        self.target = float(target_ongoing_requests)
        self.busy = False
        self.last_active = -math.inf  # the pool was never active: nothing to keep warm

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = float(ctx.current_time)
        load = float(ctx.total_num_requests)
        want, decision = self.decide(load, int(ctx.current_num_replicas), now)
        return want, {"zerostart_rung": decision.rung.value, "zerostart_reason": decision.reason}

    def decide(self, load: float, replicas: int, now: float) -> tuple[int, Any]:
        """The replica count for ``load`` requests (queued and ongoing) with ``replicas`` running."""
        if load > 0:
            if not self.busy:
                self.policy.observe_arrival(self.pool, now)
                self.busy = True
            self.last_active = now
        elif self.busy:
            self.policy.observe_completion(self.pool, now)
            self.busy = False
            self.last_active = now
        rung = Rung.HOT if replicas > 0 else Rung.ZERO
        decision = self.policy.decide(ModelView(self.pool, rung, busy=self.busy, last_active=self.last_active), now)
        if self.busy:
            return max(1, math.ceil(load / self.target)), decision
        if decision.rung in _KEEPS_REPLICA:
            # idle: one replica holds the pool's models (hot or parked); from zero this is a pre-warm
            return 1, decision
        if decision.prewarm_at is not None and decision.prewarm_at <= now:
            return 1, decision
        return 0, decision
