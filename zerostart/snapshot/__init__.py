"""Ready images, parking and waking, and suspending foreign GPU processes (docs/design.md §2).

- :func:`write_engine_image` (over :func:`write_image`) / :func:`check_compatible` /
  :func:`read_manifest`: a model exactly as the engine holds it after prepare, restored by one
  sequential, checksummed read.
- :class:`Parking`: release an allocation (weights arena, KV cache) and bring it back at the
  same addresses; on CUDA through :class:`VmmBuffer` (allocate with :func:`vmm_allocator`).
- :func:`suspend` / :func:`resume`: the CUDA driver's process checkpoint API for engines the
  fleet manages but did not write.
"""

from zerostart.snapshot._engine_image import write_engine_image
from zerostart.snapshot._foreign import CheckpointUnavailable, resume, state, suspend
from zerostart.weights import (
    MANIFEST,
    Fingerprint,
    ImageError,
    ImageIncompatible,
    check_compatible,
    fingerprint,
    image_store,
    is_image,
    read_manifest,
    write_image,
)
from zerostart.snapshot._park import EngineParking, Parking, ParkStats
from zerostart.snapshot._vmm import VmmBuffer, VmmUnavailable, buffer_of, require_vmm, vmm_allocator

__all__ = [
    "MANIFEST",
    "CheckpointUnavailable",
    "EngineParking",
    "Fingerprint",
    "ImageError",
    "ImageIncompatible",
    "ParkStats",
    "Parking",
    "VmmBuffer",
    "VmmUnavailable",
    "buffer_of",
    "check_compatible",
    "fingerprint",
    "image_store",
    "is_image",
    "read_manifest",
    "require_vmm",
    "resume",
    "state",
    "suspend",
    "vmm_allocator",
    "write_engine_image",
    "write_image",
]
