"""When to move a model along the cold ladder (docs/design.md, "The cold ladder"). Pure: no
I/O (but ``CostModel.from_file``), no clocks, no imports of the rest of zerostart but its
torch-free leaf (``zerostart.names``: the rungs; ``zerostart.units``: durations in policy specs,
decimal GB). The server's fleet and the trace simulator call the same policy objects with the
same observations; a model without a ``keep_alive_policy`` has the fixed timeout
``FixedTTL(idle_timeout, park_s=park_after)``.

    >>> from zerostart import policy
    >>> p = policy.make("ttl:300")
    >>> p.observe_arrival("m", 0.0); p.observe_completion("m", 2.0)
    >>> p.decide(policy.ModelView("m", policy.Rung.HOT, busy=False, last_active=2.0), now=10.0).rung
    <Rung.HOT: 'hot'>
"""

from typing import TYPE_CHECKING, Any

from zerostart.policy._base import LADDER, Decision, ModelView, Policy, PolicyError, Rung, usable
from zerostart.policy._costs import CostModel
from zerostart.policy._hybrid import HybridHistogram
from zerostart.policy._spec import POLICY_NAMES, describe, make
from zerostart.policy._ttl import AlwaysWarm, FixedTTL
from zerostart.policy._victims import Candidate, choose_victim

if TYPE_CHECKING:
    from zerostart.policy._ladder import CostAwareLadder

__all__ = [
    "LADDER",
    "POLICY_NAMES",
    "AlwaysWarm",
    "Candidate",
    "CostAwareLadder",
    "CostModel",
    "Decision",
    "FixedTTL",
    "HybridHistogram",
    "ModelView",
    "Policy",
    "PolicyError",
    "Rung",
    "choose_victim",
    "describe",
    "make",
    "usable",
]


def __getattr__(name: str) -> Any:
    if name == "CostAwareLadder":
        # it plans with numpy: imported on first use, so a gateway whose models use none never pays for numpy
        from zerostart.policy._ladder import CostAwareLadder

        return CostAwareLadder
    raise AttributeError(f"module 'zerostart.policy' has no attribute {name!r}")
