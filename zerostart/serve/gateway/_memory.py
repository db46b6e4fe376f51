"""Device memory: how much a replica will hold, the per-device budget, what each replica has
reserved, and who goes first when a new model needs room (the fleet's lifecycle acts on it).

Estimates come from the checkpoint's safetensors headers or GGUF tensor table (no torch
needed): the weights as the engine will hold them, plus ``kv_cache_bytes`` when the model sets
it; or the model's ``memory_estimate``, which should then include the KV cache and activations.
A source not on this machine yet (``hf://`` not in the hub cache, ``s3://`` or ``https://`` not
in the local cache) has no estimate (None) until the first worker reports the bytes it holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Iterable, Literal

from zerostart import weights
from zerostart.names import DTYPE_BYTES, default_dtype, device_type
from zerostart.policy import Candidate, choose_victim
from zerostart.serve._config import ModelConfig
from zerostart.serve.backends import device_total_bytes
from zerostart.serve.edge import StartFailed
from zerostart.serve.gateway._metrics import DeviceGauges
from zerostart.serve.gateway._state import State
from zerostart.units import format_size

if TYPE_CHECKING:
    from zerostart.policy import Candidate
    from zerostart.serve.gateway._model import Model
    from zerostart.serve.gateway._replica import Replica

log = logging.getLogger("zerostart.serve")

_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # cast to the load dtype; others kept as stored


def estimate_bytes(model: ModelConfig) -> int | None:
    """Device bytes one replica of ``model`` holds: ``memory_estimate`` if set, else its weights
    as loaded plus ``kv_cache_bytes`` (raises ``WeightsError`` for an unreadable checkpoint);
    None for a source with no copy on this machine yet. Matrices held quantized (a GGUF file's
    quants unless ``quantize: none``; a float checkpoint's under ``quantize: int8 | int4``) count
    as their integers and scales, floats at the load dtype: on CPU a model held quantized
    computes in float32 (the engine's rule)."""
    if model.memory_estimate is not None:
        return model.memory_estimate
    path = weights.local_copy(model.path)
    if path is None:
        return None
    gguf = weights.gguf_file(path)
    if gguf is not None:
        table = weights.open_gguf(gguf)
        keep = model.quantize != "none"
        held = [weights.gguf_held_nbytes(t.qtype, t.shape) if keep and t.name.endswith(".weight") else None
                for t in table.tensors]
        width = _width(model, _config_dtype(table.dir), any(h is not None for h in held))
        weight_bytes = sum(t.numel * width if h is None else h for t, h in zip(table.tensors, held))
        return weight_bytes + (model.kv_cache_bytes or 0)
    ckpt = weights.resolve(path)
    tensors = [(name, t) for h in ckpt.headers for name, t in h.tensors.items()]
    held = [weights.quantized_nbytes(name, t.shape, model.quantize) if t.dtype in _FLOAT_DTYPES else None
            for name, t in tensors]
    width = _width(model, _config_dtype(_dir(path)), any(h is not None for h in held))
    weight_bytes = sum(h if h is not None else t.numel * width if t.dtype in _FLOAT_DTYPES else t.nbytes
                       for (_, t), h in zip(tensors, held))
    return weight_bytes + (model.kv_cache_bytes or 0)


def _width(model: ModelConfig, config_dtype: str | None, quantized: bool) -> int:
    """Bytes per element of the floats a replica holds."""
    if model.dtype is None and quantized and device_type(model.device) == "cpu":
        return DTYPE_BYTES["float32"]
    return DTYPE_BYTES[model.dtype or default_dtype(device_type(model.device), config_dtype)]


def memory_shares(models: Iterable[ModelConfig], limits: dict[str, int | None],
                  device_total: Callable[[str], int | None] | None = None) -> dict[str, int | None]:
    """Each model's share of its device: the device bytes one replica may hold, whatever its
    engine. ``memory_estimate`` when set; else the device's ``memory_budget``, or for a GPU
    without one its whole memory, split equally among the models on it; None on a CPU without a
    budget (the engines' own defaults). Engines are sized from it (zerostart's KV cache on a GPU,
    vLLM's --gpu-memory-utilization or CPU KV cache, SGLang's --mem-fraction-static), so that
    several models fit one GPU out of the box."""
    if device_total is None:
        device_total = device_total_bytes
    models = list(models)
    fixed: dict[str, int] = {}  # per device: what memory_estimate already gives away
    shared: dict[str, int] = {}  # per device: models that split the rest
    for m in models:
        if m.memory_estimate is not None:
            fixed[m.device] = fixed.get(m.device, 0) + m.memory_estimate
        else:
            shared[m.device] = shared.get(m.device, 0) + 1
    out: dict[str, int | None] = {}
    totals: dict[str, int | None] = {}
    for m in models:
        if m.memory_estimate is not None:
            out[m.served_name] = m.memory_estimate
            continue
        whole = limits.get(m.device)
        if whole is None and m.device.startswith("cuda"):
            if m.device not in totals:
                totals[m.device] = device_total(m.device)
            whole = totals[m.device]
        rest = (whole or 0) - fixed.get(m.device, 0)
        out[m.served_name] = rest // shared[m.device] if whole and rest > 0 else None
    return out


def _dir(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path)


def _config_dtype(model_dir: str) -> str | None:
    """The checkpoint's dtype as its config.json states it (what the engine's default follows)."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") if isinstance(cfg, dict) else None
    return dtype if isinstance(dtype, str) else None


class Budget:
    """Bytes reserved per device against optional limits. Reservations are made before a worker
    spawns and returned when its process has exited."""

    def __init__(self, limits: dict[str, int | None]) -> None:
        self._limits = dict(limits)
        self._used: dict[str, int] = {}

    def limit(self, device: str) -> int | None:
        return self._limits.get(device)

    def used(self, device: str) -> int:
        return self._used.get(device, 0)

    def fits(self, device: str, nbytes: int) -> bool:
        limit = self.limit(device)
        return limit is None or self.used(device) + nbytes <= limit

    def reserve(self, device: str, nbytes: int) -> None:
        self._used[device] = self.used(device) + nbytes

    def release(self, device: str, nbytes: int) -> None:
        left = self.used(device) - nbytes
        if left < 0:
            raise RuntimeError(f"device {device}: released {nbytes} bytes more than were reserved")
        self._used[device] = left

    def devices(self) -> list[str]:
        return sorted(set(self._limits) | set(self._used))


Eviction = tuple["Model", "Replica", Literal["park", "stop"]]


class DeviceMemory:
    """The fleet's device memory: the budget, what each replica reserved, and whom to move down
    to make room. It decides; the lifecycle acts (parks, stops, waits)."""

    def __init__(self, limits: dict[str, int | None], models: dict[str, Model]) -> None:
        self.budget = Budget(limits)
        self._models = models
        self._changed = asyncio.Event()

    # -- waiting for room -------------------------------------------------------------------

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change (a replica idle, moved down, gone): wait on it for room."""
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def fits(self, m: Model, need: int) -> bool:
        return self.budget.fits(m.cfg.device, need)

    def fits_once_freed(self, m: Model, need: int) -> bool:
        """Whether ``need`` bytes fit once the replicas already on their way down (stopping, or
        parking where that frees device memory) have let go: then waiting makes the room, and
        moving one more model down would be one too many."""
        dev = m.cfg.device
        limit = self.budget.limit(dev)
        return limit is None or self.budget.used(dev) - self._freeing(dev) + need <= limit

    def _freeing(self, device: str) -> int:
        freeing = 0
        for m in self._models.values():
            if m.cfg.device != device:
                continue
            for r in m.replicas:
                if r.state is State.STOPPING:
                    freeing += r.reserved_bytes
                elif r.state is State.PARKING:
                    freeing += max(0, r.reserved_bytes - m.parked_bytes(r))
        return freeing

    def no_room(self, m: Model, r: Replica, need: int) -> StartFailed | None:
        """Why ``m`` can never get ``need`` bytes, when waiting cannot make room: nothing on its
        device is busy, climbing or on its way down (None when something is)."""
        dev = m.cfg.device
        if self._may_free(dev, exclude=r):
            return None
        holders = ", ".join(sorted({x.name for x in self._models.values() for y in x.replicas
                                    if y.reserved_bytes and x.cfg.device == dev})) or "nothing"
        return StartFailed(f"model {m.name!r} needs an estimated {format_size(need)} of {dev} memory; the budget "
                           f"is {format_size(self.budget.limit(dev) or 0)} and {format_size(self.budget.used(dev))} "
                           f"is held by models kept hot by min_replicas or pre-warm windows ({holders})",
                           cause="memory")

    def _may_free(self, device: str, exclude: Replica) -> bool:
        """Whether waiting can make room: some replica on the device is busy, climbing, or on
        its way down."""
        for m in self._models.values():
            for r in m.replicas:
                if r is exclude or m.cfg.device != device or not r.reserved_bytes:
                    continue
                if r.state in (State.STARTING, State.STOPPING, State.PARKING, State.WAKING) or r.in_flight > 0:
                    return True
        return False

    def victim(self, device: str, exclude: Model) -> Eviction | None:
        """The idle replica on ``device`` to move down, by ``policy.choose_victim`` (the rule
        the simulator follows too: the cheapest to bring back, then the least recently used),
        and how it goes: parked where that frees device memory (and keeps it close), else
        stopped. Replicas kept by a floor, busy ones and parked ones requests wait for are
        never chosen."""
        now = time.monotonic()
        candidates: list[Candidate[Eviction]] = []
        for m in self._models.values():
            if m is exclude or m.cfg.device != device:
                continue
            spare = len(m.warm()) - m.floor(now)
            idle = sorted((r for r in m.replicas if r.state is State.HOT and r.in_flight == 0), key=lambda r: r.last_active)
            restart = m.restart_s()
            for r in idle[:max(0, spare)]:
                if m.can_park and device != "cpu":  # parking frees its device memory and keeps it close
                    cost = m.last_wake_s if m.last_wake_s is not None else 0.0
                    candidates.append(Candidate((m, r, "park"), cost, r.last_active))
                else:
                    candidates.append(Candidate((m, r, "stop"), restart, r.last_active))
            if not m.waiters and m.start_task is None:
                for r in m.parked():
                    if r.reserved_bytes:  # on CPU a parked replica's weights still hold host RAM
                        candidates.append(Candidate((m, r, "stop"), restart, r.last_active))
        return choose_victim(candidates)

    # -- reservations -----------------------------------------------------------------------

    def reserve(self, m: Model, r: Replica, need: int) -> None:
        self.budget.reserve(m.cfg.device, need)
        r.reserved_bytes += need

    def release(self, m: Model, r: Replica) -> None:
        """Return everything ``r`` reserved (its process is gone)."""
        if r.reserved_bytes:
            self.budget.release(m.cfg.device, r.reserved_bytes)
            r.reserved_bytes = 0
        self.notify()

    def parked(self, m: Model, r: Replica) -> None:
        """``r`` parked: return what it no longer holds on its device."""
        keep = m.parked_bytes(r)
        if r.reserved_bytes > keep:
            self.budget.release(m.cfg.device, r.reserved_bytes - keep)
            r.reserved_bytes = keep

    def learn_size(self, m: Model, r: Replica) -> None:
        """A replica measured what it holds: a model without an estimate (a remote source not in
        the cache) takes that size, and so does every foreign engine's (its share or nothing
        was a guess) unless memory_estimate says otherwise. Its reservation follows."""
        if r.memory is None or r.memory.held_bytes <= 0:
            return
        measured_wins = m.cfg.backend != "zerostart" and m.cfg.memory_estimate is None
        if m.estimate is not None and not measured_wins:
            return
        size = r.memory.held_bytes
        m.estimate, m.estimate_source = size, "measured"
        dev = m.cfg.device
        if size > r.reserved_bytes:
            self.budget.reserve(dev, size - r.reserved_bytes)
        else:
            self.budget.release(dev, r.reserved_bytes - size)
        r.reserved_bytes = size
        limit = self.budget.limit(dev)
        log.info("model %s: holds %s on %s (measured; used as its memory estimate from now on)", m.name,
                 format_size(size), dev)
        if limit is not None and self.budget.used(dev) > limit:
            log.warning("device %s: %s reserved, over its memory budget of %s since model %s reported its size; "
                        "set memory_estimate for models loaded from remote sources or run by other engines", dev,
                        format_size(self.budget.used(dev)), format_size(limit), m.name)

    def gauges(self) -> list[DeviceGauges]:
        devices = sorted(set(self.budget.devices()) | {m.cfg.device for m in self._models.values()})
        return [DeviceGauges(d, self.budget.used(d), self.budget.limit(d)) for d in devices]
