"""Host memory faulted in ahead of a load: a process's reserve for its next CPU arena.

Bytes read from disk must land in memory, and memory a process touches for the first time
costs a page fault per page, plus whatever the hypervisor charges for backing it. Where that
is slower than the disk (measured on a Firecracker VM whose freed memory goes back to the host:
1.1-2 GB/s first touch against a 3.3-4.1 GB/s disk), the read is held to the speed of first
touch. A process that knows it will load a model soon (a standby worker) can pay that cost
ahead: :func:`reserve_host` faults memory in now; the next CPU :func:`~zerostart.weights.load`
takes it as its arena and reads cold files into it with direct I/O at the disk's speed.

    weights.reserve_host(8 << 30)         # in the standby worker, while it waits
    tensors = weights.load(path)          # later: cold files go straight into the reserve

A reserve smaller than the arena still serves its first bytes (the rest is new memory); a
larger one gives back what the arena does not use. One reserve per process; it is held until
a load takes it or :func:`release_host` frees it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from zerostart.weights._io import HUGE, PAGE, Region, align_up

_SPAN = 64 << 20  # prefault work is split into spans this big
_lock = threading.Lock()
_reserve: Region | None = None


def reserve_host(nbytes: int, *, threads: int = 2) -> float:
    """Fault in ``nbytes`` of host memory now, for the next CPU load's arena (replacing any
    reserve already held). Returns the seconds it took. ``nbytes=0`` releases the reserve."""
    global _reserve
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"reserve_host: nbytes must be a non-negative int, got {nbytes!r}")
    if threads < 1:
        raise ValueError(f"reserve_host: threads must be >= 1, got {threads}")
    release_host()
    if nbytes == 0:
        return 0.0
    t0 = time.perf_counter()
    region = Region.anonymous(align_up(nbytes, HUGE))
    try:
        spans = [(o, min(_SPAN, region.size - o)) for o in range(0, region.size, _SPAN)]
        with ThreadPoolExecutor(min(threads, len(spans))) as ex:
            list(ex.map(lambda s: region.prefault(*s), spans))
    except OSError:  # madvise failed (ENOMEM: the machine cannot hold it): give it back now
        region.close()
        raise
    with _lock:
        old, _reserve = _reserve, region
    if old is not None:
        old.close()
    return time.perf_counter() - t0


def arena_bytes(paths: list[str]) -> int:
    """The CPU arena of these safetensors files loaded without a cast (each file on a 2 MiB
    boundary): the reserve that covers such a load."""
    return sum(align_up(os.path.getsize(p), HUGE) for p in paths)


def reserved_host() -> int:
    """Bytes of host memory reserved for the next CPU load (0 if none)."""
    with _lock:
        return _reserve.size if _reserve is not None else 0


def release_host() -> None:
    """Free the reserve, if any."""
    global _reserve
    with _lock:
        old, _reserve = _reserve, None
    if old is not None:
        old.close()


def take(nbytes: int) -> tuple[Region, int] | None:
    """The reserve as a region of ``nbytes`` (its faulted-in pages first, new memory after them
    when the reserve is smaller), and how many of its bytes were faulted in; None without one."""
    global _reserve
    with _lock:
        region, _reserve = _reserve, None
    if region is None:
        return None
    size = max(align_up(nbytes, PAGE), PAGE)
    if region.size >= size:
        region.shrink(size)
        return region, region.size
    # Move the reserve's pages to the front of a region of the full size; the rest is new memory.
    have = region.size
    grown = Region.reserve(size)
    try:
        region.move_into(grown, 0)
    except OSError:  # mremap refused: free both now rather than when collected
        grown.close()
        region.close()
        raise
    grown.map_anonymous(have, size - have)
    return grown, have
