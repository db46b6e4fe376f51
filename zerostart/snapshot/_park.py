"""Parking: release a model's large allocations, keep their addresses, bring them back.

:class:`Parking` manages one allocation (a 1-D uint8 tensor: the weights arena or the KV
cache). ``park(keep=True)`` moves its bytes to host memory and frees the device (or host)
memory behind it; ``park(keep=False)`` frees it without keeping the bytes (a KV cache with no
request in flight). ``wake()`` restores memory *at the same addresses* (and the bytes, if
kept), so every view of it (model parameters, captured CUDA graphs) stays valid.

- CUDA: the allocation must be a :class:`VmmBuffer` (see :func:`vmm_allocator`). Parked bytes
  go to page-locked host memory, so waking is one host->device copy at PCIe speed.
- CPU: the same interface. Parked bytes go to a shared-memory file (memfd) and the pages
  behind the allocation are returned to the kernel with MADV_DONTNEED. Waking maps that file
  over the allocation's own addresses (MAP_SHARED | MAP_FIXED) instead of copying it back, so
  no byte moves and no new memory is touched: the wake costs the page-table fill. From then on
  the allocation *is* the file, so parking it again copies nothing, until :meth:`Parking.own_pages`
  (the worker calls it once a woken model serves) moves the bytes into private huge pages: shared
  memory's 4 KiB pages made a batch-1 decode 5-12 % slower than before the park.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zerostart import weights
from zerostart.snapshot._vmm import buffer_of
from zerostart.weights import Region

if TYPE_CHECKING:
    import torch

    from zerostart.weights import Region


@dataclass
class ParkStats:
    bytes: int = 0
    park_s: float = 0.0
    wake_s: float = 0.0  # the whole wake: memory back (CUDA: create and map) plus the copy
    wake_copy_s: float = 0.0  # the bytes' return alone (CUDA: host -> device copy; CPU: mapping the parked file back)

    @property
    def wake_gbps(self) -> float:
        return self.bytes / self.wake_s / 1e9 if self.wake_s else 0.0

    @property
    def wake_copy_gbps(self) -> float:
        return self.bytes / self.wake_copy_s / 1e9 if self.wake_copy_s else 0.0

    @property
    def park_gbps(self) -> float:
        return self.bytes / self.park_s / 1e9 if self.park_s else 0.0


class Parking:
    def __init__(self, storage, vmm=None, threads: int = 0) -> None:
        """``storage``: the allocation (uint8, 1-D). ``vmm``: its VmmBuffer on CUDA."""
        self.storage = storage
        self.vmm = vmm
        self.nbytes = storage.numel() * storage.element_size()
        self.parked = False
        self.kept = False
        self.stats = ParkStats(self.nbytes)
        self._host: torch.Tensor | None = None  # CUDA: pinned host copy (a torch tensor over a registered Region)
        self._host_region: Region | None = None
        self._memfd: int | None = None  # CPU: the file holding the parked bytes of _span()
        self._mapped = False  # CPU: the span is a shared mapping of _memfd (after a wake)
        self.threads = threads or min(16, os.cpu_count() or 1)
        if storage.device.type == "cuda" and vmm is None:
            raise ValueError("parking a CUDA allocation needs it to be a VmmBuffer (allocate it with vmm_allocator)")

    # --- CUDA ---------------------------------------------------------------------------------

    def _park_cuda(self, keep: bool) -> None:
        # torch only when parking runs: the gateway imports this package's face
        import torch

        if keep:
            if self._host is None:
                self._host_region = Region.anonymous(self.nbytes)
                host = self._host_region.tensor()[: self.nbytes]
                err = int(torch.cuda.cudart().cudaHostRegister(self._host_region.addr, self._host_region.size, 0))
                if err:
                    raise RuntimeError(f"cudaHostRegister of {self.nbytes} bytes failed (CUDA error {err})")
                self._host = host
            self._host.copy_(self.storage, non_blocking=True)
            torch.cuda.synchronize(self.storage.device)
        self.vmm.release()

    def _wake_cuda(self) -> None:
        # torch only when parking runs: the gateway imports this package's face
        import torch

        self.vmm.restore()
        if self.kept:
            t0 = time.perf_counter()
            self.storage.copy_(self._host, non_blocking=True)
            torch.cuda.synchronize(self.storage.device)
            self.stats.wake_copy_s = time.perf_counter() - t0
            # unpinning and unmapping gigabytes takes a while: not on the wake's critical path
            host, region = self._host, self._host_region
            self._host = self._host_region = None
            threading.Thread(target=self._drop_host, args=(host, region), name="zerostart-unpin", daemon=True).start()

    @staticmethod
    def _drop_host(host, region) -> None:
        # torch only when parking runs: the gateway imports this package's face
        import torch

        if region is not None:
            torch.cuda.cudart().cudaHostUnregister(region.addr)
            region.close()

    # --- CPU ----------------------------------------------------------------------------------

    def _span(self) -> tuple[int, int]:
        addr = self.storage.data_ptr()
        start = (addr + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        end = (addr + self.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        return start, max(0, end - start)

    def _park_cpu(self, keep: bool) -> None:
        start, length = self._span()
        if not length:  # smaller than a page: nothing to give back; the bytes stay in place
            return
        if not keep and self._mapped:  # the file would keep the bytes: put fresh memory there
            weights.map_anonymous_at(start, length)
            self._close_memfd()
            return
        if keep and not self._mapped:
            fd = os.memfd_create("zerostart-parked", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, length)
                base = start - self.storage.data_ptr()
                src = memoryview(self.storage.numpy()).cast("B")[base: base + length]
                self._parallel(lambda a, b: _pwrite_all(fd, src[a:b], a), length)
            except OSError:  # out of memory for the file: nothing was released, nothing is kept
                os.close(fd)
                raise
            self._memfd = fd
        # anonymous memory is freed; a shared mapping of the file only loses its page tables
        weights.release_pages(start, length, "while parking")

    def _wake_cpu(self) -> None:
        start, length = self._span()
        if not (self.kept and self._memfd is not None and length):
            return
        t0 = time.perf_counter()
        if not self._mapped:
            weights.map_shared_at(start, length, self._memfd)
            self._mapped = True
        self._parallel(lambda a, b: weights.touch_pages(start + a, b - a), length)
        self.stats.wake_copy_s = time.perf_counter() - t0

    def own_pages(self) -> int:
        """After a CPU wake: the parked file's shared pages (4 KiB apiece) replaced by private
        memory holding the same bytes (``weights.own_pages``: huge pages, a faster read for every
        step), and the file closed; parking again copies the bytes out again. The bytes moved (0:
        not a woken CPU allocation). Nothing may write the allocation meanwhile."""
        if self.storage.device.type != "cpu" or self.parked or not self._mapped:
            return 0
        start, length = self._span()
        moved = weights.own_pages(start, length)
        if moved == length:  # else (out of memory) the rest stays the file's: keep it
            self._mapped = False
            self._close_memfd()
        return moved

    def _close_memfd(self) -> None:
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None
        self._mapped = False

    def __del__(self) -> None:  # a mapping keeps the file's pages alive without the descriptor
        fd, self._memfd = getattr(self, "_memfd", None), None
        if fd is not None:
            os.close(fd)

    def _parallel(self, fn, nbytes: int) -> None:
        step = 64 << 20
        spans = [(a, min(a + step, nbytes)) for a in range(0, nbytes, step)]
        with ThreadPoolExecutor(max(1, min(self.threads, len(spans)))) as ex:
            list(ex.map(lambda s: fn(*s), spans))

    # --- public -------------------------------------------------------------------------------

    def park(self, keep: bool = True) -> None:
        if self.parked:
            return
        t0 = time.perf_counter()
        if self.storage.device.type == "cuda":
            self._park_cuda(keep)
        else:
            self._park_cpu(keep)
        self.parked, self.kept = True, keep
        self.stats.park_s = time.perf_counter() - t0

    def wake(self) -> None:
        if not self.parked:
            return
        t0 = time.perf_counter()
        if self.storage.device.type == "cuda":
            self._wake_cuda()
        else:
            self._wake_cpu()
        self.parked = False
        self.stats.wake_s = time.perf_counter() - t0

    @property
    def host_bytes(self) -> int:
        """Host memory holding parked bytes."""
        return self.nbytes if self.parked and self.kept else 0


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class EngineParking:
    """Park / wake a whole engine: its weights arena (bytes kept in host memory) and its KV
    cache (dropped). The process, the model, compiled code and CUDA graphs stay; nothing moves
    address. The caller makes sure no request is in flight (the fleet never parks a busy
    replica); parking a busy engine raises."""

    def __init__(self, engine) -> None:
        # torch only when parking runs: the gateway imports this package's face
        import torch

        self.engine = engine
        cuda = engine.device.type == "cuda"
        wbuf = buffer_of(engine.weights_storage) if cuda else None
        kvraw = getattr(engine.kv, "raw", None)
        kbuf = buffer_of(kvraw) if cuda and kvraw is not None else None
        if cuda and (wbuf is None or kbuf is None):
            raise ValueError("this engine cannot park on CUDA: load it with allocator=zerostart.snapshot.vmm_allocator "
                             "(the server does so when parking is enabled)")
        self.weights = Parking(engine.weights_storage, vmm=wbuf)
        kv_storage = kvraw if kvraw is not None else engine.kv_storage.view(-1).view(torch.uint8)
        self.kv = Parking(kv_storage, vmm=kbuf)

    @property
    def parked(self) -> bool:
        return self.weights.parked

    def own_pages(self) -> int:
        """After a wake on CPU, the weights' bytes in the process's own memory again
        (:meth:`Parking.own_pages`); the bytes moved."""
        return self.weights.own_pages()

    def park(self) -> ParkStats:
        busy = self.engine.stats().get("running", 0) + self.engine.stats().get("waiting", 0)
        if busy:
            raise RuntimeError(f"cannot park {self.engine.model_name}: {busy} request(s) in flight")
        self.weights.park(keep=True)
        self.kv.park(keep=False)
        return self.weights.stats

    def wake(self) -> ParkStats:
        self.weights.wake()
        self.kv.wake()
        self.engine.kv.reset()  # fresh memory: every block free, every position finite again
        return self.weights.stats
