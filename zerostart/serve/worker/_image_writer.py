"""After a load from the source, the worker writes the model's ready image in the background
(``images: write``): once the worker is idle, at the lowest CPU priority, while requests keep
being served (the weights are only read). On CUDA the weights are first copied to host memory
while new requests wait (no device work from this thread can then meet a CUDA graph capture),
and the file is written from there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from zerostart.serve.control import ImageReport, WorkerState
from zerostart.serve.worker import _images

if TYPE_CHECKING:
    from zerostart.engine import Engine
    from zerostart.weights import Fingerprint

log = logging.getLogger("zerostart.serve.worker")

_ENGINE_DRAIN_S = 2.0  # the host copy waits this long for sequences the engine is still finishing
_IDLE_POLL_S = 0.05  # how often the writer looks for an idle worker


class Holder(Protocol):
    """What the writer reads of the worker's holder (``_holder.py``)."""

    state: WorkerState
    engine: Engine | None
    image: ImageReport
    in_flight: dict[int, Any]
    closing: bool
    weights_lock: threading.Lock

    @property
    def name(self) -> str: ...

    def engine_busy(self) -> bool: ...

    def pause(self, paused: bool) -> None: ...


class ImageWriter:
    """One background write of ``holder``'s engine as its ready image."""

    def __init__(self, holder: Holder, fp: Fingerprint | None, identity: str | None = None) -> None:
        self._holder, self._fp, self._identity = holder, fp, identity  # identity: the source's bytes it was loaded from
        self._thread = threading.Thread(target=self._run, name="zerostart-image-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (OSError, AttributeError):
            pass
        h = self._holder
        name = h.name
        while True:
            if not self._wait_idle():
                return
            t0 = time.perf_counter()
            try:
                if not self._write():
                    continue  # being parked: wait for the wake
            except Exception as e:  # noqa: BLE001 - an image is an optimization: report, keep serving
                h.image.status, h.image.error = "write_failed", f"{type(e).__name__}: {e}"
                log.warning("model %s: writing its ready image failed: %s", name, e)
            else:
                h.image.status, h.image.error = "written", None
                log.warning("model %s: wrote its ready image %s", name, h.image.path)
            h.image.write_s = time.perf_counter() - t0
            return

    def _wait_idle(self) -> bool:
        """Until the worker is ready with nothing in flight; False when it failed or closes."""
        h = self._holder
        while h.state is not WorkerState.READY or h.in_flight or h.engine_busy():
            if h.state is WorkerState.FAILED or h.closing:
                return False
            time.sleep(_IDLE_POLL_S)
        return not h.closing  # shutting down before it began: the next start from the source writes it

    def _write(self) -> bool:
        """Write the image; False if the worker began parking first (nothing written)."""
        h = self._holder
        assert h.engine is not None
        host = None
        with h.weights_lock:  # a park waits for the weights to be read
            if h.state is not WorkerState.READY:
                return False
            h.image.status = "writing"
            if h.image.rejected is not None and h.image.path:
                _images.discard(h.image.path)  # the rejected image it replaces
            if h.engine.device.type == "cuda":
                host = host_copy(h)
            else:
                h.image.path = _images.write(h.engine, h.image.path, self._fp, identity=self._identity)
        if host is not None:
            h.image.path = _images.write(h.engine, h.image.path, self._fp, host_tensors=host, identity=self._identity)
        return True


def host_copy(holder: Holder) -> dict[str, Any]:
    """The weights as host tensors (views of one copy of the arena, at the same relative
    offsets), copied while new requests wait for it."""
    # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
    import torch

    engine = holder.engine
    assert engine is not None
    holder.pause(True)
    try:
        deadline = time.perf_counter() + _ENGINE_DRAIN_S
        while (holder.in_flight or holder.engine_busy()) and time.perf_counter() < deadline:
            time.sleep(0.01)
        storage = engine.weights_storage
        host = torch.empty(storage.shape, dtype=storage.dtype, device="cpu")  # pageable: no allocation a capture forbids
        host.copy_(storage)
    finally:
        holder.pause(False)
    base, out = storage.data_ptr(), {}
    for name, t in engine.arena.tensors.items():
        off, n = t.data_ptr() - base, t.numel() * t.element_size()
        out[name] = host[off:off + n].view(t.dtype).view(t.shape)
    return out
