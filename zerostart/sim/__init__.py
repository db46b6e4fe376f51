"""Replay real request traces against keep-alive policies; cost and latency reports.

    >>> from zerostart import policy, sim
    >>> trace = sim.derive(sim.load_trace("azure_llm_2023_conv.csv"), models=50, stretch=24)
    >>> result = sim.replay(policy.make("ladder"), trace, policy.CostModel())
    >>> result["total_cost_usd"], result["p99_added_latency_s"]

Against a live server, ``zerostart replay`` (``_cli_replay.py``) sends a trace's requests over
HTTP (``_live.py``) and sets what the server measured beside the simulator's prediction
(``_compare.py``). Uses ``zerostart.policy`` and nothing else of zerostart: a live server is
only talked to, or started as a subprocess (``_local.py``).
"""

from zerostart.sim._derive import derive, parse_popularity
from zerostart.sim._replay import Capacity, Service, Start, replay
from zerostart.sim._traces import FORMATS, Trace, TraceError, load_trace

__all__ = ["FORMATS", "Capacity", "Service", "Start", "Trace", "TraceError", "derive", "load_trace",
           "parse_popularity", "replay"]
