"""A load's result and knobs: the :class:`Arena` (one allocation and its tensors, filled in the
background if asked), :class:`LoadConfig` and :class:`LoadStats`."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

import torch

from zerostart.weights._io import DIRECT_ALIGN, Region

Mode = Literal["auto", "always", "never"]


@dataclass
class LoadConfig:
    """How a load reads. Defaults are chosen per device and cache state; see ``bench load``."""

    threads: int = 0  # reader threads; 0 = by device and cache state
    chunk_bytes: int = 0  # bytes per read; 0 = 8 MiB
    staging_bytes: int = 0  # budget for staging buffers (CUDA loads, dtype casts); 0 = 256 MiB CPU, 320 MiB CUDA
    direct_io: Mode = "auto"  # O_DIRECT for files not in the page cache
    mmap: Mode = "auto"  # CPU without a cast: map the files into the arena ("never": read them)
    warm_fraction: float = 0.5  # a file this much in the page cache counts as warm
    cache: bool = True  # remote sources: also write the bytes to the local cache tier
    verify: Literal["auto", "never"] = "auto"  # check zerostart-checksums.json blocks where present

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"LoadConfig.threads must be >= 0 (0 = automatic), got {self.threads}")
        if self.chunk_bytes and self.chunk_bytes < DIRECT_ALIGN:
            raise ValueError(f"LoadConfig.chunk_bytes must be >= {DIRECT_ALIGN} (or 0 for automatic), got {self.chunk_bytes}")
        if self.staging_bytes and self.staging_bytes < 2 * (DIRECT_ALIGN * 3):
            raise ValueError(f"LoadConfig.staging_bytes must be >= {6 * DIRECT_ALIGN} (two minimal buffers), got {self.staging_bytes}")
        if self.verify not in ("auto", "never"):
            raise ValueError(f"LoadConfig.verify must be 'auto' or 'never', got {self.verify!r}")
        for key in ("direct_io", "mmap"):
            if getattr(self, key) not in ("auto", "always", "never"):
                raise ValueError(f"LoadConfig.{key} must be 'auto', 'always' or 'never', got {getattr(self, key)!r}")
        if not 0.0 <= self.warm_fraction <= 1.0:
            raise ValueError(f"LoadConfig.warm_fraction must be within [0, 1], got {self.warm_fraction}")


@dataclass
class LoadStats:
    path: str = ""
    device: str = ""
    bytes: int = 0  # tensor bytes read from the checkpoint
    arena_bytes: int = 0
    files: int = 0
    tensors: int = 0
    strategy: dict[str, int] = field(default_factory=dict)  # files per strategy: mmap / direct / buffered
    layout: str = ""  # mirror | packed
    residency: float = 0.0  # fraction of the checkpoint in the page cache when the load began
    threads: int = 0
    chunk_bytes: int = 0
    staging_bytes: int = 0  # staging buffers allocated (the budget in use)
    staging_peak_bytes: int = 0  # most staging bytes held at once
    prefaulted_bytes: int = 0  # arena bytes that were already faulted in (a reserve_host reserve)
    verified_bytes: int = 0  # bytes checked against zerostart-checksums.json
    verify_s: float = 0.0  # CPU seconds spent hashing (summed over threads, overlapped with reads)
    setup_s: float = 0.0  # call -> reads start (headers, residency, arena and staging allocation)
    read_s: float = 0.0  # first read start -> last read end
    copy_s: float = 0.0  # first copy (or cast) start -> last copy done
    total_s: float = 0.0  # call -> every byte in place
    # the same moments as time.perf_counter() values, to place the phases on a timeline
    started_at: float = 0.0
    read_from: float = 0.0
    read_until: float = 0.0
    copy_from: float = 0.0
    copy_until: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / self.total_s / 1e9 if self.total_s else 0.0

    @property
    def read_gbps(self) -> float:
        return self.bytes / self.read_s / 1e9 if self.read_s else 0.0

    @property
    def copy_gbps(self) -> float:
        return self.bytes / self.copy_s / 1e9 if self.copy_s else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(gbps=round(self.gbps, 4), read_gbps=round(self.read_gbps, 4), copy_gbps=round(self.copy_gbps, 4))
        return d


class Arena:
    """The tensors of one load and the single allocation they view.

    ``tensors`` exist from the start; with ``background=True`` their bytes arrive while the
    caller works: :meth:`wait` blocks until the named tensors (default: all) are in place, and
    re-raises a load error.
    """

    def __init__(self, storage: torch.Tensor, tensors: dict[str, torch.Tensor], layout: Any, stats: LoadStats,
                 region: Region | None) -> None:
        self.storage = storage
        self.tensors = tensors
        self.layout = layout
        self.stats = stats
        self.region = region
        self._cond = threading.Condition()
        self._ready: set[str] = set()
        self._done = False
        self._error: BaseException | None = None
        self.opened: Any = None  # the source (a remote one commits its cache copy after the load)

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def nbytes(self) -> int:
        return self.storage.numel()

    @property
    def done(self) -> bool:
        return self._done

    @property
    def writable(self) -> bool:
        """True when the arena is private memory that may be rearranged in place: device
        memory, or a host arena with no checkpoint file mapped into it."""
        return self.storage.device.type != "cpu" or "mmap" not in self.stats.strategy

    def own_pages(self) -> int:
        """Once every byte is in place, the files mapped into a host arena replaced by memory of
        its own holding the same bytes, in huge pages where the system gives them
        (:meth:`Region.own_mapped_pages`); returns the bytes moved (0: nothing was mapped)."""
        self.wait()
        return self.region.own_mapped_pages() if self.region is not None else 0

    def is_ready(self, name: str) -> bool:
        with self._cond:
            return self._done or name in self._ready

    def wait(self, names: Iterable[str] | None = None, timeout: float | None = None) -> None:
        """Block until ``names`` (default: every tensor) are loaded. Raises the load's error, or
        TimeoutError after ``timeout`` seconds."""
        wanted = None if names is None else set(names)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._done or (wanted is not None and wanted <= self._ready):
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{self.stats.path}: tensors not loaded within {timeout} s")
                self._cond.wait(left)

    def wait_cached(self) -> None:
        """For remote sources: block until the local cache copy is committed (it is written
        in the background after the tensors are in place)."""
        self.wait()
        if self.opened is not None:
            self.opened.wait_cached()

    def mark(self, names: Iterable[str]) -> None:
        """(The loader) these tensors are in place."""
        with self._cond:
            self._ready.update(names)
            self._cond.notify_all()

    def finish(self, error: BaseException | None) -> None:
        """(The loader) every tensor is in place, or the load failed with ``error``."""
        with self._cond:
            self._error = error
            self._done = error is None
            self._cond.notify_all()




def views(storage: torch.Tensor, slots) -> dict[str, torch.Tensor]:
    """Tensors as strided views of the arena (one reinterpretation of the arena per dtype)."""
    bases: dict[torch.dtype, torch.Tensor] = {}
    out = {}
    for name, s in slots.items():
        base = bases.get(s.dtype)
        if base is None:
            base = bases[s.dtype] = storage[: storage.numel() // s.dtype.itemsize * s.dtype.itemsize].view(s.dtype)
        stride, acc = [], 1
        for d in reversed(s.shape):
            stride.append(acc)
            acc *= d
        out[name] = base.as_strided(s.shape, tuple(reversed(stride)), s.offset // s.dtype.itemsize)
    return out
