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
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch

from zerostart.weights import _reserve
from zerostart.weights._arena import Arena, LoadConfig, LoadStats, views
from zerostart.weights._checkpoint import Checkpoint
from zerostart.weights._checksums import load_for
from zerostart.weights._dtypes import parse_dtype
from zerostart.weights._errors import WeightsError
from zerostart.weights._gguf_load import load_gguf
from zerostart.weights._io import DIRECT_ALIGN, HUGE, Region, align_up, open_direct, residency
from zerostart.weights._pipeline import CpuSink, CudaSink, FileHandle, Ring, Run, Sink, default_threads
from zerostart.weights._plan import Layout, mirror_items, packed_items, plan_layout, populate_items, staged_mirror_items
from zerostart.weights._sources import Opened, open_source

PAD_PREFIX = "__zerostart_pad__"  # alignment filler tensors in ready images: loaded, never returned
# Defaults measured with `zerostart bench load --sweep` and bench/h2d_paths.py (H100 host,
# 16 cores: 16 readers reached 45-48 GB/s page cache -> pinned with 8-64 MiB reads, beside
# 55 GB/s H2D). Staging is fresh memory that a new process must first touch, so less of it
# (8 MiB buffers, two per reader) starts faster than large buffers do.
_CPU_CHUNK, _CUDA_CHUNK = 8 << 20, 8 << 20
_CPU_STAGING, _CUDA_STAGING = 256 << 20, 320 << 20
_POPULATE_SPAN = 64 << 20  # page-table population is split into spans this big, one per thread

Allocator = Callable[[int, torch.device], torch.Tensor]


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu", *, dtype: str | torch.dtype | None = None,
         config: LoadConfig | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint (safetensors file, Hugging Face directory, GGUF file, or a source) into one arena.

    Returns name -> tensor, every tensor a view into a single allocation on ``device``.
    ``dtype`` casts floating-point tensors (f16/bf16/f32/f64) during the load, without a
    second full copy; integer, bool and fp8 tensors keep their stored dtype. GGUF tensors are
    dequantized (to ``dtype``; without one, float32). ``progress(bytes_done, bytes_total)`` is
    called from loader threads as bytes land.
    """
    return load_arena(path, device, dtype=dtype, config=config, progress=progress).tensors


def load_arena(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
               dtype: str | torch.dtype | None = None, config: LoadConfig | None = None,
               progress: Callable[[int, int], None] | None = None, background: bool = False,
               allocator: Allocator | None = None, keep_quantized: bool = False) -> Arena:
    """Like :func:`load`, returning the :class:`Arena` (with statistics). With
    ``background=True`` it returns once the arena is allocated and the reads have started.
    ``allocator(nbytes, device)`` provides the device arena (a 1-D uint8 tensor), e.g. one
    whose physical memory can be released and restored at the same address (parking).
    ``keep_quantized``: a GGUF file's quantized matrices stay quantized (``QFormat``)."""
    t_start = time.perf_counter()
    cfg = config or LoadConfig()
    dev = _device(device)
    target = parse_dtype(dtype)
    opened = open_source(path, use_cache=cfg.cache)
    if opened.gguf is not None:
        return load_gguf(opened.gguf, dev, target, threads=cfg.threads, progress=progress, background=background,
                         allocator=allocator, t_start=t_start, keep_quantized=keep_quantized)
    with ExitStack() as on_error:
        on_error.callback(opened.finish, False)
        held = on_error.enter_context(ExitStack())  # file descriptors and staging, closed when the load ends
        job = _plan(opened, dev, target, cfg, held, allocator, progress, t_start)
        held = held.pop_all()
        on_error.pop_all()
    arena = job.arena
    job.run.start()
    if background:
        threading.Thread(target=job.finish, args=(held,), name="zerostart-load", daemon=True).start()
    else:
        job.finish(held)
        arena.wait()
    return arena


@dataclass
class _Job:
    """A planned load: the arena, the pipeline run that fills it, and what its end must do."""

    arena: Arena
    run: Run
    ring: Ring | None
    opened: Opened
    t_start: float

    def finish(self, held: ExitStack) -> None:
        """Wait for the reads, move relocated tensors, close files and staging, record the stats."""
        arena, run, stats = self.arena, self.run, self.arena.stats
        error: BaseException | None = None
        try:
            run.join()
            storage = arena.storage
            for s in arena.layout.slots.values():
                if s.relocate_from is not None:
                    storage[s.offset : s.offset + s.nbytes].copy_(storage[s.relocate_from : s.relocate_from + s.nbytes])
            if storage.device.type == "cuda":
                torch.cuda.synchronize(storage.device)
        except BaseException as e:
            error = e
        finally:
            held.close()  # files closed; staging unpinned and unmapped
            self.opened.finish(error is None)
        _record(stats, run, self.ring, self.t_start)
        arena.finish(error)


def _plan(opened: Opened, dev: torch.device, target: torch.dtype | None, cfg: LoadConfig, held: ExitStack,
          allocator: Allocator | None, progress, t_start: float) -> _Job:
    ckpt = opened.checkpoint
    assert ckpt is not None  # safetensors: load_arena hands a GGUF file to load_gguf
    # On CPU each file starts on a 2 MiB boundary of the (2 MiB-aligned) arena: a mapped
    # file's large page-cache folios then map whole, which makes faulting them in faster.
    layout = plan_layout(ckpt, target, HUGE if dev.type == "cpu" else DIRECT_ALIGN)
    files, strategies, residencies = _open_files(opened, dev, layout, cfg, held)
    sums = _checksums(cfg, opened, files, layout)
    staged = dev.type == "cuda" or layout.mode == "packed"
    resident = sum(r * h.data_size for r, h in zip(residencies, ckpt.headers))
    stats = LoadStats(path=ckpt.path, device=str(dev), bytes=ckpt.nbytes, arena_bytes=layout.size, files=len(files),
                      tensors=len(layout.slots), layout=layout.mode,
                      residency=round(resident / ckpt.nbytes, 4) if ckpt.nbytes else 1.0)
    for s in strategies:
        stats.strategy[s] = stats.strategy.get(s, 0) + 1
    chunk, ring_count, threads = _staging(cfg, dev, sums, layout, files, staged)
    stats.threads, stats.chunk_bytes = threads, chunk
    region, storage = _allocate(layout, dev, files, strategies, residencies, stats, allocator)
    items = _items(ckpt, files, strategies, layout, chunk, staged)
    ring = Ring(ring_count, chunk + 2 * DIRECT_ALIGN, pinned=dev.type == "cuda") if staged and items else None
    if ring is not None:
        held.callback(ring.close)
        stats.staging_bytes = ring.nbytes
    sink: Sink
    if dev.type == "cuda":
        sink = CudaSink(storage, ring_count, ring.size if ring else 0, need_scratch=layout.mode == "packed")
    else:
        sink = CpuSink(storage, region)
    tensors = views(storage, {n: sl for n, sl in layout.slots.items() if not n.startswith(PAD_PREFIX)})
    arena = Arena(storage, tensors, layout, stats, region)
    arena.opened = opened
    relocated = {n for n, s in layout.slots.items() if s.relocate_from is not None}
    # a mapped tensor is readable at once (a touch faults its pages in); relocated ones wait for their copy
    arena.mark(n for i, h in enumerate(ckpt.headers) if strategies[i] == "mmap" for n in h.tensors if n not in relocated)
    run = Run(items, files, sink, ring, threads, progress=progress, total=ckpt.nbytes,
              on_tensors_done=lambda names: arena.mark(n for n in names if n not in relocated))
    stats.setup_s = time.perf_counter() - t_start
    return _Job(arena, run, ring, opened, t_start)


def _open_files(opened: Opened, dev: torch.device, layout: Layout, cfg: LoadConfig,
                held: ExitStack) -> tuple[list[FileHandle], list[str], list[float]]:
    """A handle per file, the strategy that reads it, and how much of it the page cache holds."""
    files: list[FileHandle] = []
    strategies: list[str] = []
    residencies: list[float] = []
    # Host memory faulted in ahead (reserve_host): cold files are read into it, not mapped.
    reserved = dev.type == "cpu" and _reserve.reserved_host() > 0
    mirror_cpu = dev.type == "cpu" and layout.mode == "mirror" and cfg.mmap in ("auto", "always")
    assert opened.checkpoint is not None  # (as in _plan)
    for h, obj, tee in zip(opened.checkpoint.headers, opened.remote, opened.writers):
        if obj is not None:
            residencies.append(0.0)
            # On CPU without a cast the cache file being written is mapped as the arena
            # (as a local file would be), so streamed bytes are not held twice.
            through = tee is not None and mirror_cpu and h.file_size > 0
            strategies.append("remote-mapped" if through else "remote")
            files.append(FileHandle(h.path, h.file_size, -1, False, obj, opened.store, tee, through_cache=through))
            continue
        fd = os.open(h.path, os.O_RDONLY)
        held.callback(os.close, fd)
        res = residency(fd, h.file_size, h.data_start)
        residencies.append(res)
        warm = res >= cfg.warm_fraction
        strategy = "buffered"
        # On CPU without a cast the mapping is the arena, cold or warm: the kernel reads ahead
        # into page-cache pages that need no zeroing (anonymous memory does), and several
        # threads fault the pages in while it does (measured: bench load, cold and warm).
        # With a reserve, reading a cold file into memory already faulted in beats mapping it.
        if mirror_cpu and not (reserved and not warm and cfg.mmap == "auto"):
            strategy = "mmap"
        elif cfg.direct_io == "always" or (cfg.direct_io == "auto" and not warm):
            dfd = open_direct(h.path)
            if dfd is not None:
                held.callback(os.close, dfd)
                fd, strategy = dfd, "direct"
        strategies.append(strategy)
        files.append(FileHandle(h.path, h.file_size, fd, strategy == "direct"))
    return files, strategies, residencies


def _checksums(cfg: LoadConfig, opened: Opened, files: list[FileHandle], layout: Layout):
    """The block checksums of the local files (zerostart-checksums.json), attached to their handles."""
    if cfg.verify != "auto":
        return None
    assert opened.checkpoint is not None  # (as in _plan)
    sums = load_for([h.path for h, obj in zip(opened.checkpoint.headers, opened.remote) if obj is None])
    if sums:
        for f in files:
            f.sums = sums.get(f.path)
        if layout.mode == "packed":  # casts regroup bytes by tensor: check the files as they are first
            _verify_files([f.sums for f in files if f.sums is not None], cfg.threads or 4)
    return sums


def _staging(cfg: LoadConfig, dev: torch.device, sums, layout: Layout, files: list[FileHandle],
             staged: bool) -> tuple[int, int, int]:
    """(read size, staging buffers, reader threads): at least two buffers within the budget,
    shrinking the read size rather than exceeding it."""
    cuda = dev.type == "cuda"
    chunk = cfg.chunk_bytes or (_CUDA_CHUNK if cuda else _CPU_CHUNK)
    if sums and layout.mode == "mirror":  # reads cover whole checksum blocks
        block = next(iter(sums.values())).block_bytes
        chunk = max(block, chunk // block * block)
    budget = cfg.staging_bytes or (_CUDA_STAGING if cuda else _CPU_STAGING)
    threads = cfg.threads or default_threads(dev, any(f.direct or f.remote is not None for f in files), staged)
    if not staged:
        return chunk, 0, threads
    buf_size = chunk + 2 * DIRECT_ALIGN
    if budget < 2 * buf_size:
        buf_size = budget // 2 // DIRECT_ALIGN * DIRECT_ALIGN
        chunk = buf_size - 2 * DIRECT_ALIGN
    # enough buffers to keep every reader busy while earlier copies drain, within the budget
    ring_count = min(budget // buf_size, 2 * threads + 2)
    return chunk, ring_count, min(threads, ring_count)


def _items(ckpt: Checkpoint, files: list[FileHandle], strategies: list[str], layout: Layout, chunk: int,
           staged: bool) -> list:
    items = []
    for i, (h, f, s) in enumerate(zip(ckpt.headers, files, strategies)):
        if s == "mmap":
            # The reader threads fault the mapped pages in (and check them): the kernel reads
            # ahead what the page cache lacks, and cached pages map in parallel, faster than
            # the first touches of one thread would map them (bench load, warm).
            items += populate_items(h, i, layout.file_base[i], _POPULATE_SPAN, f.sums)
        elif layout.mode == "packed":
            items += packed_items(h, i, layout.slots, chunk, f.direct)
        elif staged:
            items += staged_mirror_items(h, i, layout.file_base[i], chunk, f.direct)
        else:
            items += mirror_items(h, i, layout.file_base[i], chunk, f.direct)
    return items


def _record(stats: LoadStats, run: Run, ring: Ring | None, t_start: float) -> None:
    stats.read_s, stats.copy_s = run.timing.read_s, run.timing.copy_s
    stats.started_at = t_start
    if run.timing.read_bytes:
        stats.read_from, stats.read_until = run.timing.read_start, run.timing.read_end
    else:  # everything was mapped: the "read" is the mapping and population
        stats.read_from, stats.read_until = t_start, t_start + stats.setup_s
    if run.timing.copy_bytes:
        stats.copy_from, stats.copy_until = run.timing.copy_start, run.timing.copy_end
    if run.verified_blocks:
        stats.verified_bytes += sum(f.size - f.sums.data_start for f in run.files if f.sums is not None and f.fd >= 0)
        stats.verify_s += run.verify_s
    stats.staging_peak_bytes = ring.peak * ring.size if ring is not None else 0
    stats.total_s = time.perf_counter() - t_start


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


def _allocate(layout: Layout, dev: torch.device, files: list[FileHandle], strategies: list[str],
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


__all__ = ["Arena", "LoadConfig", "LoadStats", "WeightsError", "load", "load_arena"]
