"""Device memory: how much a replica will hold, the per-device budget, and who goes first
when a new model needs room.

Estimates come from the checkpoint's safetensors headers (no torch needed): the weights as
the engine will hold them, plus ``kv_cache_bytes`` when the model sets it; or the model's
``memory_estimate``, which should then include the KV cache and activations. A remote source
(``s3://``, ``https://``) is read from its copy in the local cache; with none, the estimate is
unknown (None) until the first worker reports the bytes it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

from zerostart import weights
from zerostart.names import DTYPE_BYTES, Scheme, default_dtype, device_type, is_remote, source_scheme
from zerostart.serve._config import ModelConfig

_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # cast to the load dtype; others kept as stored

K = TypeVar("K")


def estimate_bytes(model: ModelConfig) -> int | None:
    """Device bytes one replica of ``model`` holds: ``memory_estimate`` if set, else its weights
    as loaded plus ``kv_cache_bytes`` (raises ``WeightsError`` for an unreadable checkpoint);
    None for a remote source that is not in the local cache."""
    if model.memory_estimate is not None:
        return model.memory_estimate
    path = local_copy(model.path)
    if path is None:
        return None
    ckpt = weights.resolve(path)
    # Without a dtype the engine loads float32 on CPU and a 16-bit type on accelerators.
    width = DTYPE_BYTES[model.dtype or default_dtype(device_type(model.device))]
    weight_bytes = sum(t.numel * width if t.dtype in _FLOAT_DTYPES else t.nbytes
                       for h in ckpt.headers for t in h.tensors.values())
    return weight_bytes + (model.kv_cache_bytes or 0)


def local_copy(path: str) -> str | None:
    """Where a model's checkpoint can be read on this machine: the path itself, the Hugging Face
    cache's snapshot of ``hf://org/name``, or the weights cache's complete copy of a remote
    source (None if it has none yet). Never touches the network."""
    if source_scheme(path) is Scheme.HF:
        return weights.hf_snapshot(path)  # WeightsError when it is not in the Hugging Face cache
    if not is_remote(path):
        return path
    cache = weights.Cache()
    return cache.snapshot_dir(path) if cache.manifest(path) is not None else None


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


@dataclass(frozen=True)
class Candidate(Generic[K]):
    """An idle replica that could be stopped to make room."""

    key: K
    restart_cost_s: float  # what bringing it back would cost (its last measured cold start)
    last_active: float  # for ties: the least recently used goes first


def choose_victim(candidates: Iterable[Candidate[K]]) -> K | None:
    """The idle replica cheapest to bring back; among equals, the least recently used."""
    best = min(candidates, key=lambda c: (c.restart_cost_s, c.last_active), default=None)
    return None if best is None else best.key
