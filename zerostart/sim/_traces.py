"""Request traces: the published LLM traces and a plain CSV, read into one shape.

  azure-llm  Azure LLM inference traces 2023 (Splitwise): ``TIMESTAMP,ContextTokens,GeneratedTokens``
             with timestamps like ``2023-11-16 18:17:03.9799600``; one service.
  mooncake   Mooncake FAST'25 traces: JSON lines with ``timestamp`` (ms), ``input_length``,
             ``output_length``; one service.
  csv        ``timestamp`` (seconds), ``model``, optionally ``input_tokens``, ``output_tokens``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

FORMATS = ("azure-llm", "mooncake", "csv")


class TraceError(ValueError):
    """A trace file is missing, malformed or empty; the message names the file and line."""


@dataclass
class Trace:
    """Requests sorted by time. ``times`` start at 0; ``models`` index ``model_names``."""

    times: np.ndarray  # float64 seconds, [N], sorted
    models: np.ndarray  # int32, [N]
    model_names: list[str]
    input_tokens: np.ndarray | None  # int64 [N] or None when the trace has none
    output_tokens: np.ndarray | None
    source: str  # the file it came from
    format: str
    derivation: list[str] = field(default_factory=list)  # how it was changed since reading

    def __len__(self) -> int:
        return int(self.times.shape[0])

    @property
    def duration_s(self) -> float:
        return float(self.times[-1] - self.times[0]) if len(self) else 0.0

    @property
    def single_service(self) -> bool:
        return len(self.model_names) == 1


def detect_format(path: Path) -> str:
    """Guess the format from the name and the first line."""
    if path.suffix.lower() in (".jsonl", ".json"):
        return "mooncake"
    with path.open(encoding="utf-8", newline="") as f:
        header = [h.strip().lower() for h in next(csv.reader(f), [])]
    if header[:3] == ["timestamp", "contexttokens", "generatedtokens"]:
        return "azure-llm"
    if "timestamp" in header and "model" in header:
        return "csv"
    raise TraceError(f"{path}: cannot tell the trace format from its header {header!r}; "
                     f"pass --format ({', '.join(FORMATS)})")


def load_trace(path: str | Path, fmt: str | None = None) -> Trace:
    """Read a trace file in one of ``FORMATS`` (guessed when ``fmt`` is None)."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"trace file {p} does not exist or is not a file")
    fmt = fmt or detect_format(p)
    if fmt == "azure-llm":
        trace = _read_azure(p)
    elif fmt == "mooncake":
        trace = _read_mooncake(p)
    elif fmt == "csv":
        trace = _read_csv(p)
    else:
        raise TraceError(f"unknown trace format {fmt!r}; valid: {', '.join(FORMATS)}")
    if len(trace) == 0:
        raise TraceError(f"{p}: no requests in the trace")
    return trace


def _finish(times: list[float], models: list[int], names: list[str], tin: list[int] | None,
            tout: list[int] | None, path: Path, fmt: str) -> Trace:
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order]
    if len(t):
        t -= t[0]
    return Trace(
        times=t,
        models=np.asarray(models, dtype=np.int32)[order],
        model_names=names,
        input_tokens=None if tin is None else np.asarray(tin, dtype=np.int64)[order],
        output_tokens=None if tout is None else np.asarray(tout, dtype=np.int64)[order],
        source=path.name,
        format=fmt,
    )


def _int_field(value: str, what: str, where: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise TraceError(f"{where}: {what} {value!r} is not an integer") from None
    if n < 0:
        raise TraceError(f"{where}: {what} {n} is negative")
    return n


def _read_azure(path: Path) -> Trace:
    times: list[float] = []
    tin: list[int] = []
    tout: list[int] = []
    day_cache: dict[str, float] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise TraceError(f"{path}: expected the header TIMESTAMP,ContextTokens,GeneratedTokens, got {header!r}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            where = f"{path}:{line}"
            if len(row) < 3:
                raise TraceError(f"{where}: expected 3 columns, got {len(row)}")
            stamp = row[0].strip()
            # "2023-11-16 18:17:03.9799600": seconds of the day plus a cached day offset
            day, _, clock = stamp.partition(" ")
            try:
                if day not in day_cache:
                    day_cache[day] = datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp()
                hh, mm, ss = clock.split(":")
                times.append(day_cache[day] + int(hh) * 3600 + int(mm) * 60 + float(ss))
            except ValueError:
                raise TraceError(f"{where}: bad timestamp {stamp!r} (expected YYYY-MM-DD HH:MM:SS.fff)") from None
            tin.append(_int_field(row[1], "ContextTokens", where))
            tout.append(_int_field(row[2], "GeneratedTokens", where))
    return _finish(times, [0] * len(times), ["service"], tin, tout, path, "azure-llm")


def _read_mooncake(path: Path) -> Trace:
    times: list[float] = []
    tin: list[int] = []
    tout: list[int] = []
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{line}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{where}: expected a JSON object per line")
            for key in ("timestamp", "input_length", "output_length"):
                if key not in obj:
                    raise TraceError(f"{where}: missing {key!r}")
            ts = obj["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                raise TraceError(f"{where}: timestamp {ts!r} is not a number of milliseconds")
            times.append(ts / 1000.0)
            tin.append(_int_field(str(obj["input_length"]), "input_length", where))
            tout.append(_int_field(str(obj["output_length"]), "output_length", where))
    return _finish(times, [0] * len(times), ["service"], tin, tout, path, "mooncake")


def _read_csv(path: Path) -> Trace:
    times: list[float] = []
    models: list[int] = []
    names: dict[str, int] = {}
    tin: list[int] = []
    tout: list[int] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = fields
        for need in ("timestamp", "model"):
            if need not in fields:
                raise TraceError(f"{path}: missing the {need!r} column (columns: timestamp, model, "
                                 f"optional input_tokens, output_tokens); got {fields!r}")
        has_in, has_out = "input_tokens" in fields, "output_tokens" in fields
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            if row.get("timestamp") is None or row.get("model") is None:
                raise TraceError(f"{where}: too few columns")
            try:
                t = float(row["timestamp"])
            except ValueError:
                raise TraceError(f"{where}: timestamp {row['timestamp']!r} is not a number of seconds") from None
            if t != t or t in (float("inf"), float("-inf")):
                raise TraceError(f"{where}: timestamp {row['timestamp']!r} is not finite")
            name = row["model"].strip()
            if not name:
                raise TraceError(f"{where}: empty model name")
            times.append(t)
            models.append(names.setdefault(name, len(names)))
            if has_in:
                tin.append(_int_field(row["input_tokens"] or "", "input_tokens", where))
            if has_out:
                tout.append(_int_field(row["output_tokens"] or "", "output_tokens", where))
    return _finish(times, models, list(names), tin if has_in else None, tout if has_out else None, path, "csv")
