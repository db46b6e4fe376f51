"""What one OpenAI request cost the engine (``control.RequestStats``), from its sequences'
events: tokens, finish reasons, the wait for a KV cache slot, time to the first token and the
gaps between tokens (stamped by the engine when it made each token, not when the route read it).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

from zerostart.serve.control import ITL_BUCKETS, RequestStats


class Timing:
    """One sequence's timeline: when it was submitted, got a slot, and made each token."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.gaps: list[float] = []
        self.finish_reason: str | None = None

    def take(self, ev: Any) -> None:
        if ev.token_id is not None:  # a generated token (not a pooled or a scoring-only answer)
            if self.last_at is None:
                self.first_at = ev.at
            else:
                self.gaps.append(ev.at - self.last_at)
            self.last_at = ev.at
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason


def request_stats(usage: dict[str, int], timings: list[Timing]) -> RequestStats:
    """The stats of a request whose ``usage`` (OpenAI's) is known and whose sequences are done."""
    counts = [0] * (len(ITL_BUCKETS) + 1)
    total = 0.0
    for t in timings:
        for gap in t.gaps:
            counts[bisect.bisect_left(ITL_BUCKETS, gap)] += 1  # le-buckets: a gap equal to a bound is in it
            total += gap
    firsts = [t.first_at - t.handle.submitted_at for t in timings if t.first_at is not None]
    waits = [w for w in (t.handle.queued_s for t in timings) if w is not None]
    return RequestStats(prompt_tokens=usage.get("prompt_tokens", 0), generation_tokens=usage.get("completion_tokens", 0),
                        finished=dict(Counter(t.finish_reason or "abort" for t in timings)),
                        queue_s=max(waits, default=0.0), first_token_s=min(firsts) if firsts else None,
                        itl_counts=counts, itl_sum=total)
