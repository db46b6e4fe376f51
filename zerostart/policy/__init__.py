"""When to move a model along the cold ladder (DESIGN.md §2). Pure: no I/O, no clocks, no
imports of the rest of zerostart. The server's fleet and the trace simulator call the same
policy objects with the same observations."""

from zerostart.policy._base import Decision, ModelView, Policy, Rung

__all__ = ["Decision", "ModelView", "Policy", "Rung"]
