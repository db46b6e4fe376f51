"""Cold-start telemetry: a timeline of named phases, each with its bytes and bandwidth.

Every cold start reports through a :class:`Timeline` (docs/design.md §4.5). Phases may overlap
(execute-while-load runs prefill while the last layers are still being copied), so each one
records its own start and end relative to the timeline's origin rather than a duration alone.
This module imports nothing heavy: the gateway uses it without torch.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

# The phases of a cold start, in pipeline order (docs/design.md §1).
PHASES = ("spawn", "import", "device_init", "fetch", "read", "copy", "prepare", "warmup", "first_token")


@dataclass
class Phase:
    name: str
    start: float  # seconds since the timeline's origin
    end: float
    bytes: int = 0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def gbps(self) -> float | None:
        """Bandwidth in GB/s (10^9 bytes per second) where bytes moved, else None."""
        if not self.bytes or self.seconds <= 0:
            return None
        return self.bytes / self.seconds / 1e9

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "start_s": round(self.start, 6), "end_s": round(self.end, 6),
                             "seconds": round(self.seconds, 6)}
        if self.bytes:
            d["bytes"] = self.bytes
            d["gbps"] = round(self.gbps or 0.0, 4)
        if self.detail:
            d["detail"] = dict(self.detail)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Phase":
        return cls(name=str(d["name"]), start=float(d["start_s"]), end=float(d["end_s"]),
                   bytes=int(d.get("bytes", 0)), detail=dict(d.get("detail", {})))


class Timeline:
    """Phases of one cold start, measured against one origin (``time.perf_counter`` based).

    >>> t = Timeline()
    >>> with t.phase("read", bytes=1 << 30):
    ...     pass
    """

    def __init__(self, origin: float | None = None, label: str = "") -> None:
        self.origin = time.perf_counter() if origin is None else origin
        self.label = label
        self.phases: list[Phase] = []

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def add(self, name: str, start: float, end: float, bytes: int = 0, **detail: Any) -> Phase:
        """Record a phase given absolute ``perf_counter`` timestamps."""
        p = Phase(name, start - self.origin, end - self.origin, bytes, detail)
        self.phases.append(p)
        return p

    def add_relative(self, name: str, start: float, end: float, bytes: int = 0, **detail: Any) -> Phase:
        """Record a phase given offsets (seconds) from this timeline's origin."""
        p = Phase(name, start, end, bytes, detail)
        self.phases.append(p)
        return p

    @contextmanager
    def phase(self, name: str, bytes: int = 0, **detail: Any) -> Iterator[Phase]:
        p = Phase(name, self.now(), self.now(), bytes, detail)
        try:
            yield p  # the caller may set p.bytes / p.detail inside the block
        finally:
            p.end = self.now()
            self.phases.append(p)

    def merge(self, other: "Timeline | dict[str, Any]", shift: float = 0.0) -> None:
        """Append another timeline's phases (e.g. a worker's), shifted by ``shift`` seconds."""
        phases = other.phases if isinstance(other, Timeline) else [Phase.from_dict(d) for d in other["phases"]]
        for p in phases:
            self.phases.append(Phase(p.name, p.start + shift, p.end + shift, p.bytes, dict(p.detail)))

    def get(self, name: str) -> Phase | None:
        for p in self.phases:
            if p.name == name:
                return p
        return None

    @property
    def total(self) -> float:
        return max((p.end for p in self.phases), default=0.0) - min((p.start for p in self.phases), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "total_s": round(self.total, 6),
                "phases": [p.to_dict() for p in sorted(self.phases, key=lambda p: p.start)]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Timeline":
        t = cls(origin=0.0, label=str(d.get("label", "")))
        t.phases = [Phase.from_dict(x) for x in d.get("phases", [])]
        return t

    def table(self) -> str:
        """A fixed-width table of the phases, for terminals and logs."""
        rows = [f"{'phase':<12} {'start s':>8} {'seconds':>8} {'bytes':>12} {'GB/s':>7}"]
        for p in sorted(self.phases, key=lambda p: p.start):
            gb = f"{p.gbps:7.2f}" if p.gbps else " " * 7
            rows.append(f"{p.name:<12} {p.start:8.3f} {p.seconds:8.3f} {p.bytes or '':>12} {gb}")
        rows.append(f"{'total':<12} {'':>8} {self.total:8.3f}")
        return "\n".join(rows)
