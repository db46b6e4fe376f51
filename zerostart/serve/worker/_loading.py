"""How a worker loads its model: from the ready image when there is a good one, else from the
source; into parkable (CUDA VMM) memory when asked. Runs on the holder's loader thread.

What to load is a :class:`~zerostart.serve.control.LoadSpec`, whichever way it came (the
command line's ``--spec``, a standby's ``POST /zerostart/load``): this is where it is read.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from zerostart.engine import EngineError
from zerostart.names import Rung, device_type
from zerostart.serve.control import ImageReport, LoadSpec
from zerostart.serve.worker import _images
from zerostart.telemetry import Timeline

if TYPE_CHECKING:
    from zerostart.engine import Engine
    from zerostart.weights import Fingerprint

log = logging.getLogger("zerostart.serve.worker")

Allocator = Callable[[int, Any], Any]  # (nbytes, torch.device) -> uint8 tensor (zerostart.snapshot.vmm_allocator)


@dataclass
class Loaded:
    """A loaded engine and what the load found out on the way."""

    engine: Engine
    rung: Rung  # IMAGE or ZERO: what it was loaded from (its image, or the source)
    image: ImageReport
    fingerprint: Fingerprint | None  # the image an engine from the source would write (None: not looked up)
    identity: str | None  # the source's bytes when they were looked up (an image built from others is stale)
    parkable: bool  # its memory can be parked
    parkable_error: str | None  # why not, when parking was asked for


def load(spec: LoadSpec, timeline: Timeline, standby_device: str | None) -> Loaded:
    """The engine for ``spec``, its phases recorded into ``timeline`` (whose own import and
    device-init phases stand for the engine's)."""
    allocator, parkable, parkable_error = _memory(spec)
    loader = _Loader(spec, allocator, timeline, standby_device)
    engine, rung = loader.run()
    return Loaded(engine, rung, loader.image, loader.fp, loader.identity, parkable, parkable_error)


def _memory(spec: LoadSpec) -> tuple[Allocator | None, bool, str | None]:
    """(allocator, parkable, why not): CPU memory can always be parked; CUDA memory only from
    VMM allocations, and only when asked (``--parkable``)."""
    if device_type(spec.device) != "cuda":
        return None, True, None
    if not spec.parkable:
        return None, False, None
    # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
    from zerostart.snapshot import VmmUnavailable, require_vmm, vmm_allocator

    try:
        require_vmm()
    except VmmUnavailable as e:
        log.warning("model %s: loading without parkable memory: %s", spec.name, e)
        return None, False, f"parking needs CUDA VMM memory, which is unavailable: {e}"
    return vmm_allocator, True, None


class _Loader:
    def __init__(self, spec: LoadSpec, allocator: Allocator | None, timeline: Timeline,
                 standby_device: str | None) -> None:
        self.spec, self.allocator = spec, allocator
        self.timeline, self.standby_device = timeline, standby_device
        self.image = ImageReport(mode=spec.images, status="off")
        self.fp: Fingerprint | None = None
        self.identity: str | None = None

    def run(self) -> tuple[Engine, Rung]:
        spec = self.spec
        if _images.is_image(spec.model):
            self.image.path, self.image.status = spec.model, "is_source"
            return self._from_pretrained(spec.model), Rung.IMAGE
        if spec.images != "off":
            engine = self._from_image()
            if engine is not None:
                return engine, Rung.IMAGE
        return self._from_pretrained(spec.model), Rung.ZERO

    def _from_image(self) -> Engine | None:
        """The engine from the image store's image of the source, or None (missing, rejected,
        the store unavailable: the reason is in ``self.image``)."""
        # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
        from zerostart import weights

        spec = self.spec
        try:
            path, self.fp, self.identity = _images.locate(spec.model, spec.device, spec.dtype,
                                                             spec.engine_options.quantize)
        except (EngineError, weights.WeightsError, weights.SourceError, OSError, ValueError) as e:
            self.image.status, self.image.error = "unavailable", str(e)
            log.warning("model %s: the image store could not be consulted (%s); loading the source", spec.name, e)
            return None
        self.image.path = path
        why = _images.check(path, self.fp, self.identity)
        if why is not None:
            if why == "missing":
                self.image.status = "missing"
            else:
                self._reject(path, why, time.perf_counter())
            return None
        t0 = time.perf_counter()
        try:
            engine = self._from_pretrained(path)
        except (ValueError, OSError, RuntimeError) as e:
            # EngineError and WeightsError (checksums, truncation, an incompatible manifest)
            # are ValueErrors; I/O errors are OSErrors. Whatever it was, the image is not
            # served from: the source is loaded instead.
            self._reject(path, str(e), t0)
            gc.collect()  # the failed attempt's memory, before the source's load
            return None
        self.image.status = "used"
        return engine

    def _reject(self, path: str, why: str, t0: float) -> None:
        self.image.status, self.image.rejected = "rejected", why
        self.timeline.add("rejected_image", t0, time.perf_counter(), path=path, reason=why)
        log.warning("model %s: not serving from the ready image %s: %s; loading the source %s instead",
                    self.spec.name, path, why, self.spec.model)

    def _from_pretrained(self, path: str) -> Engine:
        # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
        from zerostart.engine import Engine

        spec = self.spec
        tl = Timeline(origin=self.timeline.origin)
        engine = Engine.from_pretrained(path, device=spec.device, dtype=spec.dtype, config=spec.engine_options,
                                        timeline=tl, allocator=self.allocator)
        # The engine times its own import and device init; ours (measured around the whole
        # import, or the standby's preparation) stand for them.
        have = {p.name for p in self.timeline.phases}
        for p in tl.phases:
            if p.name == "import" and "import" in have:
                continue
            if p.name == "device_init" and self.standby_device == str(engine.device):
                continue
            self.timeline.phases.append(p)
        return engine
