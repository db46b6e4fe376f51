"""Replay real request traces against keep-alive policies; cost and latency reports.

    >>> from zerostart import policy, sim
    >>> trace = sim.derive(sim.load_trace("azure_llm_2023_conv.csv"), models=50, stretch=24)
    >>> result = sim.replay(policy.make("ladder"), trace, policy.CostModel())
    >>> result["total_cost_usd"], result["p99_added_latency_s"]

Uses ``zerostart.policy`` and nothing else of zerostart.
"""

from zerostart.sim._derive import derive, parse_popularity
from zerostart.sim._replay import Capacity, Service, replay
from zerostart.sim._traces import FORMATS, Trace, TraceError, load_trace

__all__ = ["FORMATS", "Capacity", "Service", "Trace", "TraceError", "derive", "load_trace", "parse_popularity",
           "replay"]
