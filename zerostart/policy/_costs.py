"""What holding and climbing each rung costs, in dollars and seconds.

Every default lives in this file, in the :class:`CostModel` fields below, with its source.
Prices are public list prices (on-demand, US regions); check them against your own bill and
override them in a costs file (``CostModel.from_file``). Sizes are decimal: 1 GB = 10^9 bytes.

Prices
  device_usd_per_hour        2.99      Lambda on-demand 8x NVIDIA H100 SXM, $2.99 per GPU-hour
                                       (lambda.ai/pricing, 2025).
  host_ram_usd_per_gb_hour   0.004237  Google Compute Engine N2 memory, us-central1 on-demand,
                                       $0.004237 per GB-hour (cloud.google.com/compute/vm-instance-pricing).
  disk_usd_per_gb_month      0.08      Amazon EBS gp3 storage, us-east-1, $0.08 per GB-month
                                       (aws.amazon.com/ebs/pricing).
Not a price
  latency_usd_per_s          0.01      What one second a user waits on a cold start is worth to
                                       you: an assumption (about a $36/hour value of time), set
                                       it yourself, or set ``p99_target_s`` instead.
Wake times when no telemetry is given (the bandwidth model; docs/design.md §1–2):
  parked: parked_fixed_s + GB / h2d_gbps
  image:  spawn_s + image_warmup_s + GB / min(disk_gbps, h2d_gbps)
  zero:   spawn_s + source_warmup_s + GB / min(source_gbps, h2d_gbps)
  (``standby: true`` drops spawn_s: a standby worker has already imported and initialized.)
  h2d_gbps 25       pinned host->device copy, PCIe Gen4 x16 in practice (Gen5 reaches ~50)
  disk_gbps 6       one PCIe Gen4 NVMe drive, sequential read
  source_gbps 1.25  a 10 Gb/s link to object storage or a model hub
  spawn_s 3         process spawn + import torch + CUDA context (docs/design.md §1: 1-3 s + 0.3-1 s)
  image_warmup_s 1  warm-up with compile caches and graphs restored from the image
  source_warmup_s 15  prepare + torch.compile + graph capture from scratch (docs/design.md: 1-30 s)
  parked_fixed_s 0.05  the wake call and re-mapping reserved addresses
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zerostart.policy._base import LADDER, PolicyError, Rung
from zerostart.units import GB, HOURS_PER_MONTH


# coldstart telemetry rung names -> what they measure
_TELEMETRY_RUNGS = {"parked": Rung.PARKED, "image": Rung.IMAGE, "source": Rung.ZERO, "zero": Rung.ZERO,
                    "standby": None,  # standby: an image restored by a standby worker
                    "reserve": None}  # the same with a host memory reserve: accepted, not used (standby is)


@dataclass(frozen=True)
class CostModel:
    """Prices, the value of latency, and how long each rung takes to climb to HOT.

    Every field can be set in a costs file (YAML or JSON, keys exactly as these field names,
    plus ``wake_s: {parked: S, image: S, zero: S, standby: S}`` to pin measured wake times).
    """

    # prices (sources in the module docstring)
    device_usd_per_hour: float = 2.99
    host_ram_usd_per_gb_hour: float = 0.004237
    disk_usd_per_gb_month: float = 0.08
    # the value of latency: dollars per second of cold-start delay one request feels,
    # or a p99 added-latency target the cost-aware policy tunes itself to meet
    latency_usd_per_s: float = 0.01
    p99_target_s: float | None = None
    # what a model holds
    device_share: float = 1.0  # devices one HOT replica occupies (1: one replica per GPU)
    worker_ram_gb: float = 1.0  # host RAM a parked worker holds beyond its weights
    model_gb: float = 16.0  # size of a model whose size is not given (an 8B model in bf16)
    # the bandwidth model of wake times
    h2d_gbps: float = 25.0
    disk_gbps: float = 6.0
    source_gbps: float = 1.25
    spawn_s: float = 3.0
    image_warmup_s: float = 1.0
    source_warmup_s: float = 15.0
    parked_fixed_s: float = 0.05
    standby: bool = False
    # measured wake seconds per model name ("*": any model), keys parked/image/zero/standby
    measured: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "measured":
                _check_measured(value)
            elif f.name == "standby":
                if not isinstance(value, bool):
                    raise PolicyError(f"cost model: 'standby' must be true or false, got {value!r}")
            elif f.name == "p99_target_s" and value is None:
                continue
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise PolicyError(f"cost model: {f.name!r} must be a finite number, got {value!r}")
                if value < 0:
                    raise PolicyError(f"cost model: {f.name!r} must not be negative, got {value!r}")
        for name in ("h2d_gbps", "disk_gbps", "source_gbps", "model_gb"):
            if getattr(self, name) <= 0:
                raise PolicyError(f"cost model: {name!r} must be positive, got {getattr(self, name)!r}")

    # -- holding and climbing -----------------------------------------------------------

    def size_gb(self, size_bytes: int = 0) -> float:
        return size_bytes / GB if size_bytes > 0 else self.model_gb

    def hold_usd_per_s(self, rung: Rung, size_bytes: int = 0) -> float:
        """Dollars per second a model of this size costs while resting on ``rung``."""
        gb = self.size_gb(size_bytes)
        if rung is Rung.HOT:
            return self.device_usd_per_hour * self.device_share / 3600.0
        if rung is Rung.PARKED:
            return (gb + self.worker_ram_gb) * self.host_ram_usd_per_gb_hour / 3600.0
        if rung is Rung.IMAGE:
            return gb * self.disk_usd_per_gb_month / (HOURS_PER_MONTH * 3600.0)
        return 0.0

    def wake_s(self, rung: Rung, size_bytes: int = 0, model: str = "") -> float:
        """Seconds from ``rung`` to HOT: measured telemetry if given for this model, else the
        bandwidth model."""
        if rung is Rung.HOT:
            return 0.0
        measured = self.measured.get(model) or self.measured.get("*")
        if measured:
            if rung is Rung.IMAGE and self.standby and "standby" in measured:
                return measured["standby"]
            if rung.value in measured:
                return measured[rung.value]
        return self.modeled_wake_s(rung, size_bytes)

    def modeled_wake_s(self, rung: Rung, size_bytes: int = 0) -> float:
        """Seconds from ``rung`` to HOT by the bandwidth model alone."""
        gb = self.size_gb(size_bytes)
        spawn = 0.0 if self.standby else self.spawn_s
        if rung is Rung.HOT:
            return 0.0
        if rung is Rung.PARKED:
            return self.parked_fixed_s + gb / self.h2d_gbps
        if rung is Rung.IMAGE:
            return spawn + self.image_warmup_s + gb / min(self.disk_gbps, self.h2d_gbps)
        return spawn + self.source_warmup_s + gb / min(self.source_gbps, self.h2d_gbps)

    def wake_source(self, rung: Rung, model: str = "") -> str:
        """Where ``wake_s`` gets its number: 'measured' or 'bandwidth model'."""
        measured = self.measured.get(model) or self.measured.get("*")
        if rung is not Rung.HOT and measured and (
                rung.value in measured or (rung is Rung.IMAGE and self.standby and "standby" in measured)):
            return "measured"
        return "bandwidth model"

    def wake_usd(self, rung: Rung, size_bytes: int = 0, model: str = "",
                 latency_usd_per_s: float | None = None) -> float:
        """Dollars one climb from ``rung`` costs: the wait one request feels, valued at
        ``latency_usd_per_s``, plus the device held while loading."""
        lam = self.latency_usd_per_s if latency_usd_per_s is None else latency_usd_per_s
        return self.wake_s(rung, size_bytes, model) * (lam + self.hold_usd_per_s(Rung.HOT, size_bytes))

    def break_even_s(self, upper: Rung, lower: Rung, size_bytes: int = 0, model: str = "") -> float:
        """Idle seconds after which resting on ``lower`` beats staying on ``upper`` (ski rental:
        the extra holding cost of ``upper`` equals the extra wake cost of ``lower``)."""
        dw = self.wake_usd(lower, size_bytes, model) - self.wake_usd(upper, size_bytes, model)
        dc = self.hold_usd_per_s(upper, size_bytes) - self.hold_usd_per_s(lower, size_bytes)
        if dw <= 0:
            return 0.0
        return math.inf if dc <= 0 else dw / dc

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "cost model") -> "CostModel":
        """A cost model from a mapping of field names (missing ones keep their defaults)."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        valid = [f.name for f in dataclasses.fields(cls) if f.name != "measured"] + ["wake_s"]
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in valid:
                raise PolicyError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(valid))}")
            if key == "wake_s":
                kwargs["measured"] = {"*": _parse_wake_table(value, f"{where}: 'wake_s'")}
            elif key == "p99_target_s" and value is None:
                kwargs[key] = None
            elif key == "standby":
                if not isinstance(value, bool):
                    raise PolicyError(f"{where}: 'standby' must be true or false, got {value!r}")
                kwargs[key] = value
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise PolicyError(f"{where}: {key!r} must be a number, got {value!r}")
                kwargs[key] = float(value)
        try:
            return cls(**kwargs)
        except PolicyError as e:
            raise PolicyError(str(e).replace("cost model", where, 1)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "CostModel":
        """Load a costs file: YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        suffix = p.suffix.lower()
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise PolicyError(f"costs file {p}: not valid JSON: {e}") from None
        elif suffix in (".yaml", ".yml"):
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise PolicyError(f"costs file {p}: not valid YAML: {e}") from None
            if data is None:
                data = {}
        else:
            raise PolicyError(f"costs file {p}: unknown format {suffix or '(no suffix)'!r}; use .yaml, .yml or .json")
        return cls.from_mapping(data, where=f"costs file {p}")

    def with_coldstart(self, telemetry: Mapping[str, Any], model: str | None = None) -> "CostModel":
        """This cost model with wake times measured by ``zerostart coldstart --json``.

        ``telemetry`` is that file's object: ``{"model": str, "bytes": int, "rungs": {"source":
        {"median_s": float, ...}, "image": {...}, "parked": {...}, "standby": {...}}, ...}`` with
        any subset of rungs (a ``reserve`` rung is accepted and not used); other keys are ignored. The times apply to ``model`` (default: the
        file's own model name); ``model="*"`` applies them to every model and also takes the
        file's ``bytes`` as the default model size.
        """
        if not isinstance(telemetry, Mapping):
            raise PolicyError(f"coldstart telemetry: expected a JSON object, got {type(telemetry).__name__}")
        rungs = telemetry.get("rungs")
        if not isinstance(rungs, Mapping) or not rungs:
            raise PolicyError("coldstart telemetry: missing 'rungs' (an object of rung name -> {median_s: seconds})")
        table: dict[str, float] = {}
        for name, entry in rungs.items():
            if name not in _TELEMETRY_RUNGS:
                raise PolicyError(f"coldstart telemetry: unknown rung {name!r}; valid: {', '.join(_TELEMETRY_RUNGS)}")
            if not isinstance(entry, Mapping) or "median_s" not in entry:
                raise PolicyError(f"coldstart telemetry: rung {name!r} has no 'median_s'")
            seconds = entry["median_s"]
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (seconds >= 0) \
                    or not math.isfinite(seconds):
                raise PolicyError(f"coldstart telemetry: rung {name!r} median_s must be a non-negative number, "
                                  f"got {seconds!r}")
            if name == "reserve":
                continue
            key = "zero" if name == "source" else name
            table[key] = float(seconds)
        key = model if model is not None else telemetry.get("model")
        if not isinstance(key, str) or not key:
            raise PolicyError("coldstart telemetry: no 'model' name in the file; pass model='*' to apply it to all")
        changes: dict[str, Any] = {"measured": {**self.measured, key: table}}
        if key == "*" and "bytes" in telemetry:
            size = telemetry["bytes"]
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise PolicyError(f"coldstart telemetry: 'bytes' must be a positive integer, got {size!r}")
            changes["model_gb"] = size / GB
        return dataclasses.replace(self, **changes)

    def describe(self, size_bytes: int = 0, model: str = "") -> list[str]:
        """Human-readable lines: prices, holding cost and wake time per rung."""
        lines = [
            f"prices: device ${self.device_usd_per_hour:g}/h x share {self.device_share:g}, host RAM "
            f"${self.host_ram_usd_per_gb_hour:g}/GB-h, disk ${self.disk_usd_per_gb_month:g}/GB-month; "
            + (f"p99 target {self.p99_target_s:g} s" if self.p99_target_s is not None
               else f"latency valued at ${self.latency_usd_per_s:g} per second a request waits"),
            f"model size: {self.size_gb(size_bytes):g} GB" + ("" if size_bytes else " (cost model default)"),
        ]
        for rung in LADDER:
            hold = self.hold_usd_per_s(rung, size_bytes) * 3600.0
            wake = self.wake_s(rung, size_bytes, model)
            src = "" if rung is Rung.HOT else f" ({self.wake_source(rung, model)})"
            lines.append(f"  {rung.value:<7} holds ${hold:.4f}/h, wakes to hot in {wake:.2f} s{src}")
        return lines


def _parse_wake_table(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where} must map rung names to seconds")
    table: dict[str, float] = {}
    for name, seconds in value.items():
        if name not in _TELEMETRY_RUNGS:
            raise PolicyError(f"{where}: unknown rung {name!r}; valid: {', '.join(_TELEMETRY_RUNGS)}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (seconds >= 0):
            raise PolicyError(f"{where}: {name!r} must be a non-negative number of seconds, got {seconds!r}")
        table["zero" if name == "source" else name] = float(seconds)
    return table


def _check_measured(measured: Any) -> None:
    if not isinstance(measured, Mapping):
        raise PolicyError("cost model: 'measured' must map model names to {rung: seconds}")
    for model, table in measured.items():
        _parse_wake_table(table, f"cost model: measured[{model!r}]")
