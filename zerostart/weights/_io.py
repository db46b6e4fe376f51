"""Low-level file and memory primitives: positional reads, direct I/O, page-cache residency and
eviction, and page-aligned host memory regions (anonymous or file-mapped) that torch tensors can view.

Linux-first: ``mincore``, ``MAP_POPULATE``, ``MAP_FIXED`` and ``MADV_HUGEPAGE`` come from libc
through ctypes. Where something is unavailable (another OS, a filesystem without O_DIRECT) the
callers fall back to plain buffered reads.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any


PAGE = mmap.PAGESIZE
DIRECT_ALIGN = 4096  # O_DIRECT offset/length/address alignment (logical block size, at most a page)
HUGE = 2 << 20

_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
_MAP_NORESERVE, _MAP_POPULATE = 0x4000, 0x8000
_MADV_WILLNEED, _MADV_DONTNEED, _MADV_HUGEPAGE, _MADV_POPULATE_WRITE = 3, 4, 14, 23
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_MAP_FAILED = ctypes.c_void_p(-1).value

_LINUX = sys.platform.startswith("linux")
# None off Linux (Region's constructors raise ENOSYS there); Any: mypy cannot carry those checks into the calls
_libc: Any = ctypes.CDLL(None, use_errno=True) if _LINUX else None
if _libc is not None:
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _libc.mremap.restype = ctypes.c_void_p
    _libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    _libc.syscall.restype = ctypes.c_long

O_DIRECT = getattr(os, "O_DIRECT", 0)
_populate_write_ok = True


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def align_down(n: int, a: int) -> int:
    return n // a * a


def _check(ret: int | None, what: str) -> int:
    """Raise OSError for a failed mmap (MAP_FAILED) or a failed int-returning call (-1)."""
    if ret is None or ret == _MAP_FAILED or ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


# ---------------------------------------------------------------------------------------------
# Host memory regions


def _aligned_mmap(size: int, prot: int) -> int:
    """Anonymous private memory of ``size`` bytes, 2 MiB-aligned when it is at least that big."""
    flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
    if size < HUGE:
        return _check(_libc.mmap(None, size, prot, flags, -1, 0), "mmap")
    raw = _check(_libc.mmap(None, size + HUGE, prot, flags, -1, 0), "mmap")
    addr = align_up(raw, HUGE)
    if addr > raw:
        _libc.munmap(raw, addr - raw)
    if raw + HUGE > addr:
        _libc.munmap(addr + size, raw + HUGE - addr)
    return addr


class Region:
    """A page-aligned range of host virtual memory owned by this object (unmapped on close/GC).

    ``Region.anonymous(n)`` is ordinary zero-filled memory with transparent huge pages
    requested, which makes first-touch page faults ~3x cheaper for multi-GB arenas.
    ``Region.reserve(n)`` reserves address space only; ``map_file`` then places a file's pages
    at a fixed offset in it (private, copy-on-write: reads share the page cache, writes copy).
    """

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self._lock = threading.Lock()
        self._closed = False
        self.mapped: list[tuple[int, int]] = []  # (offset, length) of the file ranges map_file placed

    @classmethod
    def anonymous(cls, size: int, huge: bool = True) -> "Region":
        """Zero-filled memory; regions of 2 MiB or more start on a 2 MiB boundary, so huge pages
        (anonymous, or the page cache's large folios once files are mapped in) can back them."""
        size = max(align_up(size, PAGE), PAGE)
        if _libc is None:
            raise OSError(errno.ENOSYS, "anonymous regions need Linux")
        addr = _aligned_mmap(size, _PROT_READ | _PROT_WRITE)
        if huge:
            _libc.madvise(addr, size, _MADV_HUGEPAGE)  # advisory; failure is harmless
        return cls(addr, size)

    @classmethod
    def reserve(cls, size: int) -> "Region":
        size = max(align_up(size, PAGE), PAGE)
        if _libc is None:
            raise OSError(errno.ENOSYS, "address reservations need Linux")
        return cls(_aligned_mmap(size, _PROT_NONE), size)

    def map_file(self, offset: int, fd: int, length: int) -> None:
        """Map ``length`` bytes of ``fd`` (from file offset 0) at ``offset`` in this region.

        Private and copy-on-write: the pages are the page cache's own until a write copies the
        one page it touches. Nothing is read here; :meth:`populate` fills the page tables.
        """
        assert offset % PAGE == 0 and offset + length <= self.size
        length = align_up(length, PAGE)
        addr = _check(_libc.mmap(self.addr + offset, length, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_FIXED, fd, 0), "mmap")
        assert addr == self.addr + offset
        self.mapped.append((offset, length))

    def own_mapped_pages(self, piece: int = 8 << 20) -> int:
        """Put memory of this region's own (:func:`own_pages`) in place of the file ranges
        :meth:`map_file` placed; return the bytes moved. The ranges must not be written meanwhile."""
        moved = 0
        with self._lock:
            while self.mapped and not self._closed:
                offset, length = self.mapped[0]
                done = own_pages(self.addr + offset, length, piece)
                moved += done
                if done < length:  # out of memory: the rest serves mapped
                    break
                self.mapped.pop(0)
        return moved

    def populate(self, offset: int, length: int) -> None:
        """Fault in ``[offset, offset + length)`` readable, reading any page not yet cached.

        Copy-on-write is not broken (reads only); see :func:`touch_pages`.
        """
        touch_pages(self.addr + offset, length)

    def prefault(self, offset: int, length: int) -> None:
        """Fault in ``[offset, offset + length)`` of anonymous memory, writable, so later writes
        (reads landing from disk) find the pages present. MADV_POPULATE_WRITE (Linux 5.14+),
        else one written byte per page. Releases the GIL; threads may prefault disjoint ranges."""
        global _populate_write_ok
        start = align_down(offset, PAGE)
        span = align_up(offset + length, PAGE) - start
        if span <= 0:
            return
        if _populate_write_ok:
            if _libc.madvise(self.addr + start, span, _MADV_POPULATE_WRITE) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOSYS):
                raise OSError(err, f"madvise(MADV_POPULATE_WRITE): {os.strerror(err)}")
            _populate_write_ok = False
        # numpy and torch only when a load runs: the gateway imports this package's face
        import numpy as np

        pages = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(self.addr + start))
        pages[::PAGE] = 0  # memory is zero-filled: writing zero changes nothing but maps the page

    def shrink(self, size: int) -> None:
        """Give back everything past the first ``size`` bytes (rounded up to a page)."""
        size = max(align_up(size, PAGE), PAGE)
        with self._lock:
            if not self._closed and size < self.size:
                _libc.munmap(self.addr + size, self.size - size)
                self.size = size

    def move_into(self, dest: "Region", offset: int = 0) -> None:
        """Move this region's pages (page tables, not bytes) to ``offset`` in ``dest``, a
        reservation or region at least that large; this region is empty afterwards."""
        assert offset % PAGE == 0 and offset + self.size <= dest.size
        with self._lock:
            if self._closed:
                raise ValueError("region is closed")
            _check(_libc.mremap(self.addr, self.size, self.size, _MREMAP_MAYMOVE | _MREMAP_FIXED, dest.addr + offset),
                   "mremap")
            self._closed = True  # its range now belongs to dest

    def advise_willneed(self, offset: int, length: int) -> None:
        """Start asynchronous readahead of a mapped range (no-op where unsupported)."""
        start = align_down(offset, PAGE)
        _libc.madvise(self.addr + start, align_up(offset + length, PAGE) - start, _MADV_WILLNEED)

    def map_anonymous(self, offset: int, length: int, huge: bool = True) -> None:
        """Back ``[offset, offset + length)`` of a reservation with ordinary writable memory."""
        assert offset % PAGE == 0
        length = align_up(length, PAGE)
        map_anonymous_at(self.addr + offset, length)
        if huge:
            _libc.madvise(self.addr + offset, length, _MADV_HUGEPAGE)

    def buffer(self, offset: int = 0, length: int | None = None) -> memoryview:
        """A writable memoryview of part of the region (valid while the region is open)."""
        length = self.size - offset if length is None else length
        arr = (ctypes.c_uint8 * length).from_address(self.addr + offset)
        arr._zerostart_region = self  # type: ignore[attr-defined]  # keeps the mapping alive as long as the view
        return memoryview(arr).cast("B")

    def tensor(self):
        """The whole region as a 1-D uint8 torch tensor sharing its memory (keeps it alive)."""
        # numpy and torch only when a load runs: the gateway imports this package's face
        import torch

        arr = (ctypes.c_uint8 * self.size).from_address(self.addr)
        arr._zerostart_region = self  # type: ignore[attr-defined]  # (as in buffer)
        return torch.frombuffer(arr, dtype=torch.uint8)

    def close(self) -> None:
        with self._lock:
            if not self._closed and _libc is not None:
                _libc.munmap(self.addr, self.size)
                self._closed = True

    def __del__(self) -> None:
        self.close()


# Raw page-aligned ranges (parking works on addresses it does not own as a Region)


def map_shared_at(addr: int, length: int, fd: int) -> None:
    """Replace ``[addr, addr + length)`` with a shared, writable mapping of ``fd`` from offset 0."""
    assert addr % PAGE == 0 and length % PAGE == 0
    got = _check(_libc.mmap(addr, length, _PROT_READ | _PROT_WRITE, _MAP_SHARED | _MAP_FIXED, fd, 0), "mmap")
    assert got == addr


def own_pages(addr: int, length: int, piece: int = 8 << 20) -> int:
    """Put fresh private memory holding the same bytes in place of ``[addr, addr + length)``
    (a file's pages, mapped), ``piece`` bytes at a time, huge pages requested on the 2 MiB grid;
    return the bytes moved, fewer where memory ran out (the rest stays as it was).

    A mapped file is served from the page cache's pages as they happen to be, and those of a
    file this host just wrote (a ready image) read slower than huge pages: an arena of them ran at
    23.5 GB/s where the same bytes in huge pages ran at 31.7 (a batch-1 decode step of SmolLM2's
    Q8_0 image: 103-116 against 145-153 tokens/s; read back by the kernel's readahead instead,
    the file's pages ran at 29.9). Shared memory (a woken parked model's) is 4 KiB pages.
    Each piece is copied into new memory and moved over its range in one ``mremap``: the
    addresses (every tensor's view) stay, and a reader sees the same bytes before and after, so
    the range must not be written meanwhile. The file keeps its own pages."""
    cuts = sorted({addr, addr + length, *range(align_up(addr, HUGE), addr + length, piece)})
    moved = 0
    for a, b in zip(cuts, cuts[1:]):
        try:
            _replace_with_copy(a, b - a, huge=a % HUGE == 0)
        except OSError:
            break
        moved += b - a
    return moved


def _replace_with_copy(addr: int, length: int, huge: bool) -> None:
    """Fresh private memory holding ``[addr, addr + length)``'s bytes, moved over that range
    (2 MiB-aligned ranges: huge pages requested, and kept by the move)."""
    tmp = _aligned_mmap(length, _PROT_READ | _PROT_WRITE) if huge else \
        _check(_libc.mmap(None, length, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0), "mmap")
    if huge:
        _libc.madvise(tmp, length, _MADV_HUGEPAGE)  # advisory; failure is harmless
    ctypes.memmove(tmp, addr, length)
    if _libc.mremap(tmp, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, addr) != addr:
        err = ctypes.get_errno()
        _libc.munmap(tmp, length)  # the range keeps its file's pages
        raise OSError(err, f"mremap: {os.strerror(err)}")


def map_anonymous_at(addr: int, length: int) -> None:
    """Replace ``[addr, addr + length)`` with fresh zero-filled private memory."""
    assert addr % PAGE == 0 and length % PAGE == 0
    got = _check(_libc.mmap(addr, length, _PROT_READ | _PROT_WRITE,
                            _MAP_PRIVATE | _MAP_FIXED | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0), "mmap")
    assert got == addr


def release_pages(addr: int, length: int, when: str) -> None:
    """MADV_DONTNEED: anonymous pages are freed (and read as zeros after); a shared file
    mapping only drops its page-table entries (the file keeps the bytes)."""
    if _libc.madvise(addr, length, _MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_DONTNEED) {when}: {os.strerror(err)}")


def touch_pages(addr: int, length: int) -> None:
    """Fault in the mapped range ``[addr, addr + length)`` readable by reading one byte per
    page: each read fault maps a whole batch of resident pages (the kernel's fault-around),
    which measured faster than MADV_POPULATE_READ's page-by-page walk for the page cache and
    as fast for a shared-memory file. Releases the GIL (numpy), so several threads can touch
    disjoint ranges in parallel."""
    # numpy and torch only when a load runs: the gateway imports this package's face
    import numpy as np

    start = align_down(addr, PAGE)
    span = align_up(addr + length, PAGE) - start
    if span <= 0:
        return
    pages = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(start))
    int(pages[::PAGE].sum(dtype=np.uint64))


# ---------------------------------------------------------------------------------------------
# Files


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(os.uname().machine) if _LINUX else None
_cachestat_ok = _SYS_CACHESTAT is not None


_SAMPLE_WINDOWS, _SAMPLE_BYTES = 32, 1 << 20


def residency(fd: int, size: int, offset: int = 0, length: int | None = None, *, exact: bool = False) -> float:
    """Fraction of ``[offset, offset + length)`` of a file that is in the page cache (0..1).

    Asks the kernel (``cachestat``, Linux 6.5+) or falls back to ``mincore`` on a transient
    mapping; no page is read either way. Returns 0.0 where unknown. Ranges over 64 MiB are
    sampled (32 windows of 1 MiB, evenly spaced, first and last included) unless ``exact``:
    counting every page of a large file costs milliseconds per GB.
    """
    length = size - offset if length is None else length
    if length <= 0 or _libc is None:
        return 0.0 if length > 0 else 1.0
    if exact or length <= 2 * _SAMPLE_WINDOWS * _SAMPLE_BYTES:
        return _residency(fd, offset, length)
    step = (length - _SAMPLE_BYTES) / (_SAMPLE_WINDOWS - 1)
    return sum(_residency(fd, offset + int(i * step), _SAMPLE_BYTES) for i in range(_SAMPLE_WINDOWS)) / _SAMPLE_WINDOWS


def _residency(fd: int, offset: int, length: int) -> float:
    global _cachestat_ok
    start = align_down(offset, PAGE)
    span = align_up(offset + length, PAGE) - start
    pages = span // PAGE
    if _cachestat_ok:
        rng, cs = _CacheStatRange(start, span), _CacheStat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(cs), 0) == 0:
            return min(1.0, cs.nr_cache / pages)
        _cachestat_ok = False  # ENOSYS on older kernels: use mincore from now on
    addr = _libc.mmap(None, span, _PROT_READ, _MAP_SHARED, fd, start)
    if addr in (None, _MAP_FAILED):
        return 0.0
    try:
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, span, vec) != 0:
            return 0.0
        # numpy and torch only when a load runs: the gateway imports this package's face
        import numpy as np

        return int((np.ctypeslib.as_array(vec) & 1).sum()) / pages
    finally:
        _libc.munmap(addr, span)


def open_direct(path: str) -> int | None:
    """An O_DIRECT descriptor for ``path``, or None where the OS or filesystem refuses it."""
    if not O_DIRECT:
        return None
    try:
        return os.open(path, os.O_RDONLY | O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


def pread_into(fd: int, buf: memoryview, offset: int, file_size: int, path: str) -> int:
    """Fill ``buf`` from ``fd`` at ``offset``; bytes past the end of the file stay untouched.

    Returns the number of bytes read. Raises OSError naming the file if it ends early (a file
    that shrank under the reader).
    """
    want = min(len(buf), max(0, file_size - offset))
    done = 0
    while done < want:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"{path}: file ended at byte {offset + done}, expected {file_size} bytes (truncated while loading?)")
        done += n
    return done


def cached_fraction(path: str) -> float:
    """Fraction of the file at ``path`` in the page cache now (0..1; sampled as :func:`residency`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return residency(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Eviction:
    """What :func:`evict_page_cache` did to one file: the fraction of it in the page cache
    before and after (0..1, counted page by page)."""

    path: str
    size: int
    resident_before: float
    resident_after: float

    @property
    def left_bytes(self) -> int:
        """Bytes of the file still cached: pages another process maps, or dirty pages that a
        concurrent writer made after the flush, stay."""
        return int(self.resident_after * self.size)


def evict_page_cache(paths: list[str]) -> list[Eviction]:
    """Evict these files, and nothing else, from the page cache: each is flushed (``fsync``:
    dirty pages cannot be dropped) and advised ``POSIX_FADV_DONTNEED``, then its residency is
    counted (``cachestat`` or ``mincore``). Needs no privilege and leaves every other file's
    cache as it was. Pages that a process maps stay cached (the kernel keeps them): the
    result says how much stayed, per file."""
    out = []
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            before = residency(fd, size, exact=True)
            os.fsync(fd)  # (allowed on a read-only descriptor on Linux)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            out.append(Eviction(p, size, before, residency(fd, size, exact=True)))
        finally:
            os.close(fd)
    return out


def drop_all_page_caches() -> None:
    """Drop the whole machine's page cache (and dentries and inodes) through
    ``/proc/sys/vm/drop_caches``, as after a reboot: every process's files, Python's and torch's
    libraries included, are read from disk again, which slows everything else running on the
    machine. Root only; raises ``PermissionError`` saying so. Prefer
    :func:`evict_page_cache` for a model's own files."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise PermissionError(e.errno, "dropping the machine's page cache needs root (writing "
                              f"/proc/sys/vm/drop_caches failed: {e.strerror})") from None
