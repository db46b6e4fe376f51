"""The worker process's heap policy (glibc's malloc; where the C library lacks these calls,
nothing happens).

A worker holds one model for hours, and its resident memory is what a host packs models by.
Two habits of glibc's malloc keep memory resident after it is freed:

- the mmap threshold is dynamic: after the first large block is freed it rises (up to 32 MiB),
  so later large temporaries (a load's converted tensors, a prefill's activations) come from
  the heap and can stay there after they are freed. :func:`fix_mmap_threshold` pins it at
  1 MiB, so blocks that large are mapped and unmapped (a decode step's blocks are smaller);
- freed blocks stay in each thread's arena: :func:`trim` hands them back, after a load or a park.

Measured on SmolLM2-135M's Q4_1 file (one thread, a worker serving it over HTTP): resident
415 MB -> 380 MB after the load, peak 432 MB -> 415 MB.
"""

from __future__ import annotations

import ctypes

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # no such C library function here
        return None


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Blocks of ``nbytes`` and more are mapped and unmapped by the system from now on (a fixed
    threshold: glibc stops raising it). False where malloc has no such setting."""
    mallopt = _libc_function("mallopt")
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, nbytes))


def trim() -> bool:
    """Hand freed heap memory back to the system (every arena's). False where there is no
    ``malloc_trim``."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
