"""The worker process's heap policy (glibc's malloc; where the C library lacks these calls,
nothing happens).

A worker holds one model for hours, and its resident memory is what a host packs models by;
its steps allocate the same temporaries again and again, and a temporary that the system maps
afresh is faulted in page by page each time. glibc's malloc maps every block above its mmap
threshold, and the threshold is dynamic: it starts at 128 KiB and rises (up to 32 MiB) when a
mapped block is freed. So the policy has two phases:

- :func:`for_loading`: the threshold pinned at 1 MiB before the load's first large block, so
  the load's converted tensors and copies are unmapped the moment they are freed instead of
  staying in the heap (left dynamic, the threshold rises after the first large free and later
  large temporaries stay resident);
- :func:`for_serving`, once the load is done: the freed heap handed back (every arena's), then
  the threshold raised to 32 MiB and the trim threshold to 64 MiB, so a step's temporaries (a
  prefill chunk's activations, a batch's logits: a few MiB) are reused from the heap rather
  than mapped and faulted in at every step.

Measured on SmolLM2-135M's Q8_0 file (a worker serving it over HTTP, two threads): with the
1 MiB threshold kept while serving, a 384-token prefill took 49,000 page faults and a batch-16
decode step 2,900; with the serving phase, 3,000 and 290, prefill 717 -> ~1,050 tokens/s and
batch-16 decode ~440 -> ~600 tokens/s (noisy), the peak resident memory 462 -> 468 MB.

The heap is not all a worker holds: its libraries' code is mapped from their files, and importing
torch runs the initializers spread over all of ``libtorch_cpu.so``, which leaves ~110 MB of its
code resident that no step runs again. :func:`release_code` unmaps the resident pages of every
read-only private mapping of a shared library that holds no private copies (code, constants):
the kernel keeps them in the page cache and maps back, with a minor fault, the pages that are
used again. The worker calls it after its imports and after its load.

Its weights, on CPU, are often a file's pages too: an image (or a checkpoint that needs no cast)
is mapped into the arena, which starts a model soonest, and a woken parked model is its parked
file's shared memory. Once it serves, :func:`own_weights` moves those bytes into huge pages of
its own (``weights.own_pages``): the pages an image's writer left in the page cache, and shared
memory's 4 KiB pages, read slower, and a batch-1 decode step, which reads every weight, ran
25-50 % faster from huge pages (SmolLM2's Q8_0 image, one thread: 103-116 -> 145-153 tokens/s).
"""

from __future__ import annotations

import ctypes
import os
from typing import Protocol

LOAD_MMAP_THRESHOLD = 1 << 20
SERVE_MMAP_THRESHOLD = 32 << 20
SERVE_TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # no such C library function here
        return None


def _mallopt(param: int, value: int) -> bool:
    mallopt = _libc_function("mallopt")
    return bool(mallopt is not None and mallopt(param, value))


def for_loading() -> bool:
    """Blocks of 1 MiB and more are mapped and unmapped by the system from now on (a fixed
    threshold: glibc stops raising it). False where malloc has no such setting."""
    return _mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)


def for_serving() -> bool:
    """The load's freed memory back to the system (and its code's pages: :func:`release_code`),
    then blocks up to 32 MiB served from the heap and the heap's top kept up to 64 MiB, for the
    steps to reuse. False where malloc has no such settings."""
    trimmed = trim()
    release_code()
    return _mallopt(_M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, SERVE_TRIM_THRESHOLD) and trimmed


def release_code(smaps: str = "/proc/self/smaps") -> int:
    """Unmap the resident pages of this process's read-only private mappings of shared libraries
    that hold no private copies (``Anonymous: 0``: nothing there but the file's own bytes: code
    and constants), and return how many bytes were resident in them. A page used again is mapped
    back from the page cache. 0 where there is no ``smaps`` (not Linux)."""
    # imported once the worker has imported the engine (the import phase's end, or the load's)
    from zerostart import weights

    try:
        mappings = _clean_file_mappings(smaps)
    except OSError:  # no /proc here
        return 0
    released = 0
    for start, end, resident in mappings:
        try:
            weights.release_pages(start, end - start, "releasing a library's code")
        except OSError:  # unmapped since smaps was read: nothing to release there
            continue
        released += resident
    return released


def _clean_file_mappings(smaps: str) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of each mapping in ``smaps`` that is a shared library's,
    private, not writable, resident in part and without anonymous (copied-on-write) pages."""
    found: list[tuple[int, int, int]] = []
    header: list[str] = []
    fields: dict[str, int] = {}

    def close() -> None:
        # header: address range, permissions (rwxp / rwxs), offset, device, inode, path
        if len(header) == 6 and ".so" in os.path.basename(header[5]) and header[1][1] != "w" and header[1][3] == "p" \
                and fields.get("Anonymous") == 0 and fields.get("Rss", 0) > 0:
            start, end = (int(a, 16) for a in header[0].split("-"))
            found.append((start, end, fields["Rss"] * 1024))

    with open(smaps) as f:
        for line in f:
            first, _, rest = line.partition(" ")
            if not first.endswith(":"):  # the next mapping's header
                close()
                header, fields = line.rstrip("\n").split(maxsplit=5), {}
            elif rest.rstrip().endswith(" kB"):
                fields[first[:-1]] = int(rest.split()[0])
    close()
    return found


class OwnsPages(Protocol):
    def own_pages(self) -> int: ...


def own_weights(weights: OwnsPages) -> int:
    """``weights``' file pages moved into the worker's own memory (see the module's text): an
    ``Arena``'s mapped files, or an ``EngineParking``'s parked file after a wake (both have
    ``own_pages``); the bytes moved. Nothing where the system gives no transparent huge pages."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return 0
    except OSError:  # not Linux, or no THP: the pages would be no larger
        return 0
    return weights.own_pages()


def trim() -> bool:
    """Hand freed heap memory back to the system (every arena's). False where there is no
    ``malloc_trim``."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
