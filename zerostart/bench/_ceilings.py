"""The physical limits a load is measured against, taken in the same run as the loads.

- cold read: the same files read with direct I/O into memory that is already faulted in, both
  sequentially (one reader, 64 MiB blocks, as ``dd iflag=direct``) and in parallel (16
  readers, 4 MiB blocks); the ceiling is the better of the two.
- cold read into fresh memory: the same direct reads (8 readers, 8 MiB) in a new process into
  newly allocated memory, as any loader must end: where first-touching memory is slow (a VM
  whose host backs guest memory lazily), this, not the disk, is the floor.
- warm read: the same files read from the page cache into faulted-in memory (all cores).
- memcpy: RAM to RAM within the process.
- pinned host->device: one pinned buffer copied to the GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from zerostart.bench import _env
from zerostart.bench._env import log
from zerostart.weights import Region, drop_all_page_caches, evict_page_cache, open_direct, pread_into

_BUF = 256 << 20  # readers cycle through this much faulted-in memory


def drop(files: list[str], machine: bool = False) -> None:
    """Make ``files`` cold: evict them (and nothing else) from the page cache; with
    ``machine``, drop the whole machine's page cache first (root; every process's files,
    torch's libraries included). Says so when part of a file stayed cached."""
    if machine:
        drop_all_page_caches()
    for e in evict_page_cache(files):
        if e.resident_after > 0.01:
            log(f"  note: {e.left_bytes / 1e6:.0f} MB of {e.path} stayed in the page cache after eviction "
                "(mapped by a running process?); its cold numbers are partly warm")


def warm(files: list[str]) -> None:
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def _read_all(files: list[str], threads: int, block: int, direct: bool, buf: Region) -> float:
    total = 0
    t0 = time.perf_counter()
    for p in files:
        size = os.path.getsize(p)
        fd = open_direct(p) if direct else None
        if fd is None:
            fd = os.open(p, os.O_RDONLY)
        try:
            offsets = list(range(0, size, block))
            slots = max(1, _BUF // block)

            def rd(i_off):
                i, off = i_off
                slot = (i % slots) * block
                pread_into(fd, buf.buffer(slot, block), off, size, p)

            if threads == 1:
                for x in enumerate(offsets):
                    rd(x)
            else:
                with ThreadPoolExecutor(threads) as ex:
                    list(ex.map(rd, enumerate(offsets)))
        finally:
            os.close(fd)
        total += size
    return total / (time.perf_counter() - t0) / 1e9


def measure(files: list[str], device: str, cold: bool) -> dict[str, float]:
    buf = Region.anonymous(_BUF + (64 << 20))
    buf.tensor().fill_(0)  # fault every page in before timing
    out: dict[str, float] = {}
    if cold:
        drop(files)
        out["cold_sequential"] = _read_all(files, 1, 64 << 20, True, buf)
        drop(files)
        out["cold_parallel"] = _read_all(files, 16, 4 << 20, True, buf)
        out["cold_read"] = max(out["cold_sequential"], out["cold_parallel"])
        drop(files)
        out["cold_fresh"] = _fresh_read(files)
    warm(files)
    out["warm_read"] = _read_all(files, os.cpu_count() or 1, 8 << 20, False, buf)
    out["memcpy"] = _memcpy()
    if device.startswith("cuda"):
        out["pinned_h2d"] = pinned_h2d(device)
    buf.close()
    return out


_FRESH = """
import os, sys, time, json
from concurrent.futures import ThreadPoolExecutor
from zerostart.weights import Region, align_up, open_direct, pread_into
files = json.loads(sys.argv[1]); chunk = 8 << 20
t = time.perf_counter(); jobs = []; base = 0
total = sum(os.path.getsize(f) for f in files)
r = Region.anonymous(sum(align_up(os.path.getsize(f), 4096) for f in files) + 4096)
for f in files:
    size = os.path.getsize(f); fd = open_direct(f) or os.open(f, os.O_RDONLY)
    jobs += [(fd, base, a, size, f) for a in range(0, size, chunk)]
    base += align_up(size, 4096)
def rd(j):
    fd, b, a, size, f = j
    pread_into(fd, r.buffer(b + a, min(chunk, align_up(size - a, 4096))), a, size, f)
with ThreadPoolExecutor(8) as ex:
    list(ex.map(rd, jobs))
print(total / (time.perf_counter() - t) / 1e9)
"""


def _fresh_read(files: list[str]) -> float:
    r = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(files)], capture_output=True, text=True,
                       env=_env.child_env(), timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"fresh-memory read probe failed: {r.stderr.strip()[-400:]}")
    return float(r.stdout.strip().splitlines()[-1])


def _memcpy(n: int = 1 << 30) -> float:
    # torch only when the benchmark runs, not at the command's start
    import torch

    a = torch.ones(n, dtype=torch.uint8)
    b = torch.zeros(n, dtype=torch.uint8)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        b.copy_(a)
        runs.append(n / (time.perf_counter() - t0) / 1e9)
    return statistics.median(runs)


def pinned_h2d(device: str, n: int = 1 << 30) -> float:
    # torch only when the benchmark runs, not at the command's start
    import torch

    a = torch.ones(n, dtype=torch.uint8, pin_memory=True)
    b = torch.empty(n, dtype=torch.uint8, device=device)
    b.copy_(a, non_blocking=True)
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a, non_blocking=True)
        torch.cuda.synchronize()
        runs.append(n / (time.perf_counter() - t0) / 1e9)
    return statistics.median(runs)
