"""``load`` / ``load_arena``: a checkpoint into one arena on the target device.

Per file, the strategy follows what is measured at load time (page-cache residency via
mincore) and what ``bench load`` measured on real hardware:

| where the bytes are | CPU, no cast | CPU with cast, CUDA |
| --- | --- | --- |
| page cache (warm) | map the file into the arena (no copy) | buffered reads into staging |
| disk (cold) | map the file; reader threads fault it in as the kernel reads ahead | O_DIRECT reads into staging |
| disk (cold), with a reserve | O_DIRECT reads straight into the reserved arena | O_DIRECT reads into staging |

The host arena is anonymous memory with transparent huge pages (first-touch faults on 4 KiB
pages alone cost more than the copy), or the memory :func:`reserve_host` faulted in ahead.
Mapped files are private copy-on-write mappings: the pages are shared with the page cache (and
other processes) until a tensor is written. Replace a checkpoint by writing a new file and
renaming it, never by rewriting it in place, while a process holds it mapped.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Literal

import torch

from zerostart.weights import _reserve
from zerostart.weights._checksums import load_for
from zerostart.weights._dtypes import parse_dtype
from zerostart.weights._format import WeightsError
from zerostart.weights._io import DIRECT_ALIGN, HUGE, Region, align_up, open_direct, residency
from zerostart.weights._pipeline import CpuSink, CudaSink, FileHandle, Ring, Run, default_threads
from zerostart.weights._plan import Layout, mirror_items, packed_items, plan_layout, populate_items, staged_mirror_items
from zerostart.weights._sources import open_source

Mode = Literal["auto", "always", "never"]
PAD_PREFIX = "__zerostart_pad__"  # alignment filler tensors in ready images: loaded, never returned
# Defaults measured with `zerostart bench load --sweep` and bench/h2d_paths.py (H100 host,
# 16 cores: 16 readers reached 45-48 GB/s page cache -> pinned with 8-64 MiB reads, beside
# 55 GB/s H2D). Staging is fresh memory that a new process must first touch, so less of it
# (8 MiB buffers, two per reader) starts faster than large buffers do.
_CPU_CHUNK, _CUDA_CHUNK = 8 << 20, 8 << 20
_CPU_STAGING, _CUDA_STAGING = 256 << 20, 320 << 20
_POPULATE_SPAN = 64 << 20  # page-table population is split into spans this big, one per thread


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

    def __init__(self, storage: torch.Tensor, tensors: dict[str, torch.Tensor], layout: Layout, stats: LoadStats,
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
        opened = getattr(self, "_opened", None)
        if opened is not None:
            opened.wait_cached()

    def _mark(self, names: Iterable[str]) -> None:
        with self._cond:
            self._ready.update(names)
            self._cond.notify_all()

    def _finish(self, error: BaseException | None) -> None:
        with self._cond:
            self._error = error
            self._done = error is None
            self._cond.notify_all()


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu", *, dtype: str | torch.dtype | None = None,
         config: LoadConfig | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint (file, or Hugging Face directory) into one arena.

    Returns name -> tensor, every tensor a view into a single allocation on ``device``.
    ``dtype`` casts floating-point tensors (f16/bf16/f32/f64) during the load, without a
    second full copy; integer, bool and fp8 tensors keep their stored dtype.
    ``progress(bytes_done, bytes_total)`` is called from loader threads as bytes land.
    """
    return load_arena(path, device, dtype=dtype, config=config, progress=progress).tensors


def load_arena(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
               dtype: str | torch.dtype | None = None, config: LoadConfig | None = None,
               progress: Callable[[int, int], None] | None = None, background: bool = False,
               allocator: Callable[[int, torch.device], torch.Tensor] | None = None) -> Arena:
    """Like :func:`load`, returning the :class:`Arena` (with statistics). With
    ``background=True`` it returns once the arena is allocated and the reads have started.
    ``allocator(nbytes, device)`` provides the device arena (a 1-D uint8 tensor), e.g. one
    whose physical memory can be released and restored at the same address (parking)."""
    t_start = time.perf_counter()
    cfg = config or LoadConfig()
    dev = _device(device)
    target = parse_dtype(dtype)
    opened = open_source(path, use_cache=cfg.cache)
    ckpt = opened.checkpoint
    try:
        # On CPU each file starts on a 2 MiB boundary of the (2 MiB-aligned) arena: a mapped
        # file's large page-cache folios then map whole, which makes faulting them in faster.
        layout = plan_layout(ckpt, target, HUGE if dev.type == "cpu" else DIRECT_ALIGN)
    except BaseException:
        opened.finish(False)
        raise

    files: list[FileHandle] = []
    strategies: list[str] = []
    fds: list[int] = []
    residencies: list[float] = []
    resident_bytes = 0.0
    # Host memory faulted in ahead (reserve_host): cold files are read into it, not mapped.
    reserved = dev.type == "cpu" and _reserve.reserved_host() > 0
    try:
        for h, obj, tee in zip(ckpt.headers, opened.remote, opened.writers):
            if obj is not None:
                residencies.append(0.0)
                # On CPU without a cast the cache file being written is mapped as the arena
                # (as a local file would be), so streamed bytes are not held twice.
                through = (tee is not None and dev.type == "cpu" and layout.mode == "mirror" and h.file_size > 0
                           and cfg.mmap in ("auto", "always"))
                strategies.append("remote-mapped" if through else "remote")
                files.append(FileHandle(h.path, h.file_size, -1, False, obj, opened.transport, tee, through_cache=through))
                continue
            fd = os.open(h.path, os.O_RDONLY)
            fds.append(fd)
            res = residency(fd, h.file_size, h.data_start)
            residencies.append(res)
            resident_bytes += res * h.data_size
            warm = res >= cfg.warm_fraction
            strategy = "buffered"
            # On CPU without a cast the mapping is the arena, cold or warm: the kernel reads ahead
            # into page-cache pages that need no zeroing (anonymous memory does), and several
            # threads fault the pages in while it does (measured: bench load, cold and warm).
            # With a reserve, reading a cold file into memory already faulted in beats mapping it.
            if (dev.type == "cpu" and layout.mode == "mirror" and cfg.mmap in ("auto", "always")
                    and not (reserved and not warm and cfg.mmap == "auto")):
                strategy = "mmap"
            elif cfg.direct_io == "always" or (cfg.direct_io == "auto" and not warm):
                dfd = open_direct(h.path)
                if dfd is not None:
                    fds.append(dfd)
                    fd, strategy = dfd, "direct"
            strategies.append(strategy)
            files.append(FileHandle(h.path, h.file_size, fd, strategy == "direct"))
    except BaseException:
        for fd in fds:
            os.close(fd)
        opened.finish(False)
        raise

    sums = None
    if cfg.verify == "auto":
        local = [h.path for h, obj in zip(ckpt.headers, opened.remote) if obj is None]
        try:
            sums = load_for(local)
        except BaseException:
            for fd in fds:
                os.close(fd)
            opened.finish(False)
            raise
    if sums:
        for f in files:
            f.sums = sums.get(f.path)
        if layout.mode == "packed":  # casts regroup bytes by tensor: check the files as they are first
            _verify_files([f.sums for f in files if f.sums is not None], cfg.threads or 4)

    staged = dev.type == "cuda" or layout.mode == "packed"
    stats = LoadStats(path=ckpt.path, device=str(dev), bytes=ckpt.nbytes, arena_bytes=layout.size, files=len(files),
                      tensors=len(layout.slots), layout=layout.mode,
                      residency=round(resident_bytes / ckpt.nbytes, 4) if ckpt.nbytes else 1.0)
    for s in strategies:
        stats.strategy[s] = stats.strategy.get(s, 0) + 1

    # Staging: at least two buffers within the budget; shrink the chunk rather than exceed it.
    cuda = dev.type == "cuda"
    chunk = cfg.chunk_bytes or (_CUDA_CHUNK if cuda else _CPU_CHUNK)
    if sums and layout.mode == "mirror":  # reads cover whole checksum blocks
        block = next(iter(sums.values())).block_bytes
        chunk = max(block, chunk // block * block)
    staging_budget = cfg.staging_bytes or (_CUDA_STAGING if cuda else _CPU_STAGING)
    ring_count = 0
    if staged:
        buf_size = chunk + 2 * DIRECT_ALIGN
        if staging_budget < 2 * buf_size:
            buf_size = staging_budget // 2 // DIRECT_ALIGN * DIRECT_ALIGN
            chunk = buf_size - 2 * DIRECT_ALIGN
    threads = cfg.threads or default_threads(dev, any(f.direct or f.remote is not None for f in files), staged)
    if staged:
        # enough buffers to keep every reader busy while earlier copies drain, within the budget
        ring_count = min(staging_budget // buf_size, 2 * threads + 2)
        threads = min(threads, ring_count)
    stats.threads, stats.chunk_bytes = threads, chunk

    try:
        region, storage = _allocate(layout, dev, files, strategies, threads, residencies, stats, allocator)
        items = []
        for i, (h, f, s) in enumerate(zip(ckpt.headers, files, strategies)):
            if s == "mmap":
                # The reader threads fault the mapped pages in (and check them): the kernel reads
                # ahead what the page cache lacks, and cached pages map in parallel, faster than
                # the first touches of one thread would map them (bench load, warm).
                items += populate_items(h, i, layout.file_base[i], _POPULATE_SPAN, f.sums)
                continue
            if layout.mode == "packed":
                items += packed_items(h, i, layout.slots, chunk, f.direct)
            elif staged:
                items += staged_mirror_items(h, i, layout.file_base[i], chunk, f.direct)
            else:
                items += mirror_items(h, i, layout.file_base[i], chunk, f.direct)
        ring = Ring(ring_count, chunk + 2 * DIRECT_ALIGN, pinned=dev.type == "cuda") if staged and items else None
        if ring is not None:
            stats.staging_bytes = ring.nbytes
        if dev.type == "cuda":
            sink = CudaSink(storage, ring_count, ring.size if ring else 0, need_scratch=layout.mode == "packed")
        else:
            sink = CpuSink(storage, region)
        tensors = _views(storage, {n: sl for n, sl in layout.slots.items() if not n.startswith(PAD_PREFIX)})
    except BaseException:
        for fd in fds:
            os.close(fd)
        opened.finish(False)
        raise

    arena = Arena(storage, tensors, layout, stats, region)
    arena._opened = opened
    relocated = {n for n, s in layout.slots.items() if s.relocate_from is not None}
    # a mapped tensor is readable at once (a touch faults its pages in); relocated ones wait for their copy
    arena._mark(n for i, h in enumerate(ckpt.headers) if strategies[i] == "mmap" for n in h.tensors if n not in relocated)
    run = Run(items, files, sink, ring, threads, progress=progress, total=ckpt.nbytes,
              on_tensors_done=lambda names: arena._mark(n for n in names if n not in relocated))

    def finish() -> None:
        error: BaseException | None = None
        try:
            run.join()
            for s in layout.slots.values():
                if s.relocate_from is not None:
                    storage[s.offset : s.offset + s.nbytes].copy_(storage[s.relocate_from : s.relocate_from + s.nbytes])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        except BaseException as e:
            error = e
        finally:
            for fd in fds:
                os.close(fd)
            opened.finish(error is None)
            if ring is not None:
                ring.close()  # unpin and unmap the staging buffers
        stats.read_s, stats.copy_s = run.timing.read_s, run.timing.copy_s
        stats.started_at = t_start
        if run.timing.read_bytes:
            stats.read_from, stats.read_until = run.timing.read_start, run.timing.read_end
        else:  # everything was mapped: the "read" is the mapping and population
            stats.read_from, stats.read_until = t_start, t_start + stats.setup_s
        if run.timing.copy_bytes:
            stats.copy_from, stats.copy_until = run.timing.copy_start, run.timing.copy_end
        if run.verified_blocks:
            stats.verified_bytes += sum(_verified_bytes(files, strategies, k) for k in ("direct", "buffered", "mmap"))
            stats.verify_s += run.verify_s
        stats.staging_peak_bytes = ring.peak * ring.size if ring is not None else 0
        stats.total_s = time.perf_counter() - t_start
        arena._finish(error)

    stats.setup_s = time.perf_counter() - t_start
    run.start()
    if background:
        threading.Thread(target=finish, name="zerostart-load", daemon=True).start()
    else:
        finish()
        arena.wait()
    return arena


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__}); use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: zerostart loads to 'cpu' or 'cuda'")
    return dev


def _allocate(layout: Layout, dev: torch.device, files: list[FileHandle], strategies: list[str], threads: int,
              residencies: list[float], stats: LoadStats, allocator=None) -> tuple[Region | None, torch.Tensor]:
    if dev.type == "cuda":
        n = align_up(max(layout.size, 1), DIRECT_ALIGN)
        storage = allocator(n, dev) if allocator is not None else torch.empty(n, dtype=torch.uint8, device=dev)
        if storage.dtype != torch.uint8 or storage.dim() != 1 or storage.numel() < n or storage.device != dev:
            raise ValueError(f"allocator returned {storage.dtype} {tuple(storage.shape)} on {storage.device}; "
                             f"need uint8 of at least {n} bytes on {dev}")
        return None, storage
    got = _reserve.take(max(layout.size, 1))
    if got is not None:
        region, stats.prefaulted_bytes = got
    else:
        region = Region.anonymous(max(layout.size, 1))
    for i, f in enumerate(files):
        if strategies[i] == "mmap":
            region.map_file(layout.file_base[i], f.fd, f.size)
            if residencies[i] < 1.0:
                region.advise_willneed(layout.file_base[i], f.size)  # readahead starts now
        elif strategies[i] == "remote-mapped":
            region.map_file(layout.file_base[i], f.tee.fd, f.size)  # filled as the ranges arrive
    return region, region.tensor()


def _verified_bytes(files: list[FileHandle], strategies: list[str], which: str) -> int:
    return sum(f.size - f.sums.data_start for f, s in zip(files, strategies) if s == which and f.sums is not None)


def _verify_files(sums: list, threads: int) -> None:
    """Check whole files against their block checksums (reading them), in parallel."""
    def one(fs) -> None:
        with open(fs.path, "rb", buffering=0) as f:
            f.seek(fs.data_start)
            i = 0
            while True:
                chunk = f.read(fs.block_bytes)
                if not chunk:
                    break
                fs.check(fs.data_start + i * fs.block_bytes, memoryview(chunk))
                i += 1

    with ThreadPoolExecutor(max(1, min(threads, len(sums)))) as ex:
        list(ex.map(one, sums))


def _views(storage: torch.Tensor, slots) -> dict[str, torch.Tensor]:
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


__all__ = ["Arena", "LoadConfig", "LoadStats", "WeightsError", "load", "load_arena"]
