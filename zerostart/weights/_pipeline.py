"""The load pipeline: reader threads, a bounded staging ring, and sinks that put bytes in place.

    files ──pread / O_DIRECT──► arena (CPU, no cast: straight in, no staging)
          └─────────────────► staging ring ──► sink: cast into the arena (CPU)
                                              └─► host→device copy on a side stream (CUDA)

Reader threads pull read items in file order. A staged item holds one ring buffer from its
read until its bytes are in place (for CUDA: until the copy's event completes), so staging
memory never exceeds ``count × size`` however large the model. Completion is tracked per item
and per tensor, so a consumer can start on early tensors while later ones are still arriving.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from zerostart.weights._io import DIRECT_ALIGN, Region, align_up, pread_into
from zerostart.weights._plan import Item

Progress = Callable[[int, int], None]


@dataclass
class FileHandle:
    path: str
    size: int
    fd: int  # -1 for a remote object
    direct: bool  # fd was opened with O_DIRECT (reads are block-aligned)
    remote: Any = None  # ObjectInfo: read by ranged requests instead of the fd
    transport: Any = None
    tee: Any = None  # BlobWriter: every byte read is also written to the local cache
    sums: Any = None  # FileSums: verify blocks as they arrive
    through_cache: bool = False  # the arena maps ``tee``'s file: bytes go to the file, not the arena

    def read_into(self, buf: memoryview, offset: int) -> None:
        if self.remote is None:
            pread_into(self.fd, buf, offset, self.size, self.path)
            return
        n = max(0, min(len(buf), self.size - offset))
        if self.through_cache:
            # Into a reused scratch buffer, then into the cache file, whose page-cache pages the
            # arena maps: the bytes land in memory once. If the cache write fails, the bytes
            # are placed in the arena's own (copy-on-write) pages instead.
            scratch = _scratch(n)
            self.transport.read_range(self.remote, offset, scratch)
            self.tee.write(offset, scratch)
            if self.tee.error is not None:
                buf[:n] = scratch
            return
        self.transport.read_range(self.remote, offset, buf[:n])
        if self.tee is not None:
            self.tee.write(offset, buf[:n])


_scratch_local = threading.local()


def _scratch(n: int) -> memoryview:
    """This thread's reusable buffer, at least ``n`` bytes."""
    buf = getattr(_scratch_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _scratch_local.buf = bytearray(n)
    return memoryview(buf)[:n]


class Ring:
    """A bounded pool of equally sized staging buffers (page-locked when ``pinned``)."""

    def __init__(self, count: int, size: int, pinned: bool) -> None:
        self.count, self.size = count, align_up(size, DIRECT_ALIGN)
        # Host memory we map ourselves (huge pages, page-aligned for O_DIRECT). For CUDA each
        # buffer is page-locked with cudaHostRegister the first time a reader takes it: an
        # order of magnitude cheaper than cudaHostAlloc for the same bytes, and spread across
        # the readers instead of paid up front.
        self._region = Region.anonymous(self.count * self.size)
        self.memory = self._region.tensor()[: self.count * self.size]
        self.pinned = pinned
        self._registered = [False] * count
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(self.count):
            self._free.put(i)
        self._lock = threading.Lock()
        self.in_use = 0
        self.peak = 0

    def _register(self, i: int) -> None:
        err = int(torch.cuda.cudart().cudaHostRegister(self._region.addr + i * self.size, self.size, 0))
        if err != 0:
            raise RuntimeError(f"cudaHostRegister of a {self.size}-byte staging buffer failed (CUDA error {err})")
        self._registered[i] = True

    def close(self) -> None:
        for i, reg in enumerate(self._registered):
            if reg:
                torch.cuda.cudart().cudaHostUnregister(self._region.addr + i * self.size)
                self._registered[i] = False
        self._region.close()

    @property
    def nbytes(self) -> int:
        return self.count * self.size

    def acquire(self) -> int:
        i = self._free.get()
        if self.pinned and not self._registered[i]:
            self._register(i)
        with self._lock:
            self.in_use += 1
            self.peak = max(self.peak, self.in_use)
        return i

    def release(self, i: int) -> None:
        with self._lock:
            self.in_use -= 1
        self._free.put(i)

    def tensor(self, i: int) -> torch.Tensor:
        return self.memory[i * self.size : (i + 1) * self.size]

    def view(self, i: int, n: int) -> memoryview:
        return self.tensor(i)[:n].numpy().data.cast("B")


@dataclass
class Timing:
    read_start: float = float("inf")
    read_end: float = 0.0
    copy_start: float = float("inf")
    copy_end: float = 0.0
    read_bytes: int = 0
    copy_bytes: int = 0

    def read(self, a: float, b: float, n: int) -> None:
        self.read_start, self.read_end = min(self.read_start, a), max(self.read_end, b)
        self.read_bytes += n

    def copy(self, a: float, b: float, n: int) -> None:
        self.copy_start, self.copy_end = min(self.copy_start, a), max(self.copy_end, b)
        self.copy_bytes += n

    @property
    def read_s(self) -> float:
        return max(0.0, self.read_end - self.read_start) if self.read_bytes else 0.0

    @property
    def copy_s(self) -> float:
        return max(0.0, self.copy_end - self.copy_start) if self.copy_bytes else 0.0


class Sink:
    """Where bytes end up: the arena on its device."""

    def __init__(self, arena: torch.Tensor, region: Region | None) -> None:
        self.arena = arena  # 1-D uint8 tensor, the whole arena
        self.region = region  # CPU arenas: the host region (read targets need its address)

    def arena_view(self, offset: int, n: int) -> memoryview:
        assert self.region is not None, "direct reads need a host arena"
        return self.region.buffer(offset, n)

    def deliver(self, item: Item, ring: Ring, buf: int, done: Callable[[], None], timing: Timing) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class CpuSink(Sink):
    """Copies (and converts) staged bytes into a host arena in the reader's own thread."""

    def deliver(self, item: Item, ring: Ring, buf: int, done: Callable[[], None], timing: Timing) -> None:
        t0 = time.perf_counter()
        src = ring.tensor(buf)
        for d in item.deliveries:
            _convert(self.arena, src, d)
        timing.copy(t0, time.perf_counter(), item.payload)
        ring.release(buf)
        done()


class CudaSink(Sink):
    """Host→device copies on a side stream; a completion thread recycles buffers as each copy's
    event completes. Casts run on the device from a scratch twin of each staging buffer."""

    def __init__(self, arena: torch.Tensor, ring_count: int, ring_size: int, need_scratch: bool) -> None:
        super().__init__(arena, None)
        self.stream = torch.cuda.Stream(device=arena.device)
        self.scratch = torch.empty(ring_count * ring_size, dtype=torch.uint8, device=arena.device) if need_scratch else None
        self._lock = threading.Lock()
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._complete, name="zerostart-copy-done", daemon=True)
        self._thread.start()

    def deliver(self, item: Item, ring: Ring, buf: int, done: Callable[[], None], timing: Timing) -> None:
        src = ring.tensor(buf)
        with self._lock, torch.cuda.stream(self.stream):
            t0 = time.perf_counter()
            for d in item.deliveries:
                if d.src_dtype is None:
                    self.arena[d.arena_offset : d.arena_offset + d.nbytes].copy_(src[d.buf_offset : d.buf_offset + d.nbytes], non_blocking=True)
                else:  # raw bytes to the scratch twin of this buffer, then convert on the device
                    assert self.scratch is not None
                    scratch = self.scratch[buf * ring.size : (buf + 1) * ring.size]
                    raw = src[d.buf_offset : d.buf_offset + d.nbytes]
                    scratch[d.buf_offset : d.buf_offset + d.nbytes].copy_(raw, non_blocking=True)
                    _convert(self.arena, scratch, d)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._pending.put((event, ring, buf, done, timing, t0, item.payload))

    def _complete(self) -> None:
        while True:
            entry = self._pending.get()
            if entry is None:
                return
            event, ring, buf, done, timing, t0, n = entry
            try:
                event.synchronize()
            except BaseException as e:  # a failed copy surfaces in the loading thread
                self._error = e
            timing.copy(t0, time.perf_counter(), n)
            ring.release(buf)
            done()

    def finish(self) -> None:
        self._pending.put(None)
        self._thread.join()
        self.stream.synchronize()
        if self._error is not None:
            raise self._error


def _convert(arena: torch.Tensor, src: torch.Tensor, d) -> None:
    """Move one delivery's bytes from ``src`` (a staging buffer, host or device) into the arena,
    converting dtype when the delivery asks for it."""
    raw = src[d.buf_offset : d.buf_offset + d.nbytes]
    if d.src_dtype is None:
        arena[d.arena_offset : d.arena_offset + d.nbytes].copy_(raw)
        return
    if raw.data_ptr() % d.src_dtype.itemsize:
        raw = raw.clone()  # the file placed this tensor off its element alignment
    values = raw.view(d.src_dtype)
    n = values.numel() * d.dst_dtype.itemsize
    arena[d.arena_offset : d.arena_offset + n].view(d.dst_dtype).copy_(values)


@dataclass
class Run:
    """One pipeline execution and its completion state (shared with the loader threads)."""

    items: list[Item]
    files: list[FileHandle]
    sink: Sink
    ring: Ring | None
    threads: int
    progress: Progress | None = None
    total: int = 0
    timing: Timing = field(default_factory=Timing)
    error: BaseException | None = None
    done_bytes: int = 0
    on_tensors_done: Callable[[tuple[str, ...]], None] | None = None
    verified_blocks: int = 0
    verify_s: float = 0.0  # summed over reader threads (CPU time spent hashing)

    def __post_init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()
        self._pending_items = len(self.items)
        self._all_done = threading.Event()
        self._stop = False
        # tensor -> number of items still carrying some of its bytes
        self._remaining: dict[str, int] = {}
        for it in self.items:
            for n in it.tensors:
                self._remaining[n] = self._remaining.get(n, 0) + 1
        if not self.items:
            self._all_done.set()

    def start(self) -> list[threading.Thread]:
        if not self.items:
            self._threads = []
            return []
        threads = [threading.Thread(target=self._worker, name=f"zerostart-read-{i}", daemon=True)
                   for i in range(max(1, min(self.threads, len(self.items))))]
        for t in threads:
            t.start()
        self._threads = threads
        return threads

    def wait(self, timeout: float | None = None) -> bool:
        return self._all_done.wait(timeout)

    def join(self) -> None:
        self._all_done.wait()
        for t in getattr(self, "_threads", []):
            t.join()
        try:
            self.sink.finish()
        except BaseException as e:
            self.error = self.error or e
        if self.error is not None:
            raise self.error

    def _take(self) -> Item | None:
        with self._lock:
            if self._stop or self._next >= len(self.items):
                return None
            it = self.items[self._next]
            self._next += 1
            return it

    def _worker(self) -> None:
        try:
            while (item := self._take()) is not None:
                self._do(item)
        except BaseException as e:
            with self._lock:
                self.error = self.error or e
                self._stop = True
                self._all_done.set()

    def _do(self, item: Item) -> None:
        f = self.files[item.file]
        if item.populate:  # a mapped file: fault its pages in (the kernel reads ahead)
            assert self.sink.region is not None and item.arena_offset is not None  # a span of a host arena
            t0 = time.perf_counter()
            self.sink.region.populate(item.arena_offset, item.length)
            self.timing.read(t0, time.perf_counter(), item.payload)
            if f.sums is not None:
                self._verify(f, item, self.sink.arena_view(item.arena_offset, item.length))
            self._item_done(item)
            return
        if item.arena_offset is not None:  # straight into the arena
            t0 = time.perf_counter()
            view = self.sink.arena_view(item.arena_offset, item.length)
            f.read_into(view, item.start)
            if f.through_cache:  # map the pages just written, as for a mapped local file
                assert self.sink.region is not None  # through the cache: a host arena
                self.sink.region.populate(item.arena_offset, item.length)
            self.timing.read(t0, time.perf_counter(), item.payload)
            if f.sums is not None:
                self._verify(f, item, view)
            self._item_done(item)
            return
        assert self.ring is not None
        buf = self.ring.acquire()
        try:
            t0 = time.perf_counter()
            view = self.ring.view(buf, item.length)
            f.read_into(view, item.start)
            self.timing.read(t0, time.perf_counter(), item.payload)
            if f.sums is not None:
                self._verify(f, item, view)
        except BaseException:
            self.ring.release(buf)
            raise
        self.sink.deliver(item, self.ring, buf, lambda: self._item_done(item), self.timing)

    def _verify(self, f: FileHandle, item: Item, view: memoryview) -> None:
        t0 = time.perf_counter()
        n = f.sums.check(item.start, view[: max(0, min(item.end, f.size) - item.start)])
        with self._lock:
            self.verified_blocks += n
            self.verify_s += time.perf_counter() - t0

    def _item_done(self, item: Item) -> None:
        finished: list[str] = []
        with self._lock:
            self.done_bytes += item.payload
            done = self.done_bytes
            for n in item.tensors:
                self._remaining[n] -= 1
                if self._remaining[n] == 0:
                    finished.append(n)
            self._pending_items -= 1
            last = self._pending_items == 0
        if finished and self.on_tensors_done is not None:
            self.on_tensors_done(tuple(finished))
        if self.progress is not None:
            self.progress(done, self.total)
        if last:
            self._all_done.set()


def default_threads(device: torch.device, any_direct: bool, staged: bool) -> int:
    cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return max(8, min(32, cpus))  # memcpy-bound: one reader per core (bench/h2d_paths.py)
    if any_direct:
        return max(8, cpus)  # I/O bound: queue depth matters more than cores
    return max(1, min(16, cpus))
