"""CUDA virtual memory management (cuMemAddressReserve / Create / Map / Unmap) via cuda-bindings.

A :class:`VmmBuffer` is one device allocation whose *physical* memory can be released and
re-created while its *virtual* address range stays reserved. Torch tensors viewing it (made
through ``__cuda_array_interface__``, so no copy and no torch allocator) and CUDA graphs
captured against it keep their addresses across a release/restore cycle: that is what makes
parking a worker cheap and its graphs still valid after waking.
"""

from __future__ import annotations

import threading
from typing import Any


class VmmUnavailable(RuntimeError):
    """CUDA VMM cannot be used here (no CUDA, no cuda-bindings, or the driver refused)."""


def _driver():
    try:
        # cuda-bindings (optional): only on CUDA
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python layout
        except ImportError:
            raise VmmUnavailable("CUDA VMM needs the cuda-bindings package (pip install cuda-bindings)") from None
    return driver


def require_vmm() -> None:
    """Import the CUDA driver bindings that VMM memory needs (a parkable load on CUDA), so the
    cost is paid ahead; raises :class:`VmmUnavailable` saying what is missing."""
    _driver()


def _check(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    d = _driver()
    if err != d.CUresult.CUDA_SUCCESS:
        name = d.cuGetErrorName(err)[1]
        raise VmmUnavailable(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def _ensure_context(device: int) -> None:
    # torch only when parking runs: the gateway imports this package's face
    import torch

    torch.cuda.init()
    with torch.cuda.device(device):
        torch.empty(1, device=f"cuda:{device}")  # makes the primary context current on this thread
    d = _driver()
    ctx = _check(d.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if ctx is None or int(ctx.getPtr() if hasattr(ctx, "getPtr") else ctx) == 0:
        dev = _check(d.cuDeviceGet(device), "cuDeviceGet")
        primary = _check(d.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _check(d.cuCtxSetCurrent(primary), "cuCtxSetCurrent")


class _ArrayInterface:
    """What torch.as_tensor needs to view raw device memory without copying."""

    def __init__(self, ptr: int, nbytes: int, owner: "VmmBuffer") -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None}
        self.owner = owner  # keeps the reservation alive while any tensor views it


class VmmBuffer:
    """``nbytes`` of device memory at a fixed virtual address; physical backing can come and go."""

    def __init__(self, nbytes: int, device: int = 0) -> None:
        d = _driver()
        _ensure_context(device)
        self.device = device
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self._prop = prop
        gran = _check(d.cuMemGetAllocationGranularity(prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                      "cuMemGetAllocationGranularity")
        self.nbytes = nbytes
        self.size = max(gran, (nbytes + gran - 1) // gran * gran)
        self.ptr = int(_check(d.cuMemAddressReserve(self.size, gran, 0, 0), "cuMemAddressReserve"))
        self._handle = None
        self._lock = threading.Lock()
        try:
            self._map()
        except BaseException:
            d.cuMemAddressFree(self.ptr, self.size)
            raise

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def _map(self) -> None:
        d = _driver()
        handle = _check(d.cuMemCreate(self.size, self._prop, 0), f"cuMemCreate({self.size} bytes)")
        try:
            _check(d.cuMemMap(self.ptr, self.size, 0, handle, 0), "cuMemMap")
            access = d.CUmemAccessDesc()
            access.location = self._prop.location
            access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            _check(d.cuMemSetAccess(self.ptr, self.size, [access], 1), "cuMemSetAccess")
        except BaseException:
            d.cuMemRelease(handle)
            raise
        self._handle = handle

    def tensor(self):
        """A uint8 torch tensor over the whole buffer (same address for the buffer's life)."""
        # torch only when parking runs: the gateway imports this package's face
        import torch

        return torch.as_tensor(_ArrayInterface(self.ptr, self.nbytes, self), device=f"cuda:{self.device}")

    def release(self) -> None:
        """Free the physical memory; the address range stays reserved (contents are lost)."""
        with self._lock:
            if self._handle is None:
                return
            # torch only when parking runs: the gateway imports this package's face
            import torch

            torch.cuda.synchronize(self.device)  # nothing may still be using it
            d = _driver()
            _check(d.cuMemUnmap(self.ptr, self.size), "cuMemUnmap")
            _check(d.cuMemRelease(self._handle), "cuMemRelease")
            self._handle = None

    def restore(self) -> None:
        """Back the reserved range with fresh physical memory (contents undefined)."""
        with self._lock:
            if self._handle is None:
                self._map()

    def free(self) -> None:
        with self._lock:
            d = _driver()
            if self._handle is not None:
                d.cuMemUnmap(self.ptr, self.size)
                d.cuMemRelease(self._handle)
                self._handle = None
            if self.ptr:
                d.cuMemAddressFree(self.ptr, self.size)
                self.ptr = 0

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass


def vmm_allocator(nbytes: int, device) -> "Any":
    """An allocator for :func:`zerostart.weights.load_arena`: the arena in a VmmBuffer."""
    # torch only when parking runs: the gateway imports this package's face
    import torch

    dev = torch.device(device)
    buf = VmmBuffer(nbytes, dev.index if dev.index is not None else torch.cuda.current_device())
    t = buf.tensor()
    t._zerostart_vmm = buf
    return t


def buffer_of(t) -> VmmBuffer | None:
    """The VmmBuffer a tensor from :func:`vmm_allocator` is (None for ordinary tensors)."""
    return getattr(t, "_zerostart_vmm", None)
