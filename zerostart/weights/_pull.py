"""``pull``: a source's files into the local cache ahead of a load (``zerostart pull``)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from zerostart.names import Scheme, source_scheme
from zerostart.weights._cache import BlobWriter, Cache
from zerostart.weights._errors import CacheFull, SourceError, WeightsError
from zerostart.weights._sources import open_store, weight_objects
from zerostart.weights._store import ObjectInfo, Store
from zerostart.weights._store_hf import HfStore

Progress = Callable[[int, int], None]


def pull(spec: str, cache: Cache | None = None, concurrency: int = 16, part_bytes: int = 16 << 20,
         progress: Progress | None = None) -> str:
    """Download every file of a source into the cache and return its local directory.

    ``s3://`` and ``https://`` go into zerostart's cache (ranged, concurrent, resumable by
    object; objects already cached are not fetched again); ``hf://`` asks the hub for the
    revision's current commit and downloads what the hub cache lacks."""
    scheme = source_scheme(spec)
    if scheme is Scheme.HF:
        return HfStore(spec).download()
    if scheme is Scheme.LOCAL:
        raise WeightsError(f"{spec}: a local path needs no pull (only hf://, s3:// and http(s):// sources)")
    cache = cache or Cache()
    store = open_store(spec)
    try:
        return _pull(spec, cache, store, concurrency, part_bytes, progress)
    finally:
        store.close()


def _pull(spec: str, cache: Cache, store: Store, concurrency: int, part_bytes: int, progress: Progress | None) -> str:
    objects = store.list()
    weight_objects(spec, objects, store)  # fail early on a source that is no checkpoint
    total = sum(o.size for o in objects)
    done = 0
    lock = threading.Lock()

    def tick(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress is not None:
                progress(done, total)

    for obj in objects:
        w = cache.open_writer(obj)
        if w is None:
            tick(obj.size)
            continue
        _fill(obj, w, store, concurrency, part_bytes, tick)
        if not w.commit():
            raise SourceError(f"{obj.url}: downloaded bytes did not add up to {obj.size}; nothing was cached")
    return cache.link(spec, objects)


def _fill(obj: ObjectInfo, w: BlobWriter, store: Store, concurrency: int, part_bytes: int,
          tick: Callable[[int], None]) -> None:
    """Every byte of ``obj`` into ``w``, by concurrent ranged reads (aborting ``w`` on failure)."""
    local = threading.local()

    def part(off: int) -> None:
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < part_bytes:
            buf = local.buf = bytearray(part_bytes)
        n = min(part_bytes, obj.size - off)
        mv = memoryview(buf)[:n]
        store.read_range(obj, off, mv)
        w.write(off, mv)
        if w.error is not None:
            raise CacheFull(w.error.errno or 0, f"writing {obj.url} to the cache failed: {w.error}")
        tick(n)

    try:
        with ThreadPoolExecutor(max(1, concurrency)) as ex:
            list(ex.map(part, range(0, obj.size, part_bytes)))
        if obj.size == 0:
            w.write(0, memoryview(b""))
    except BaseException:
        w.abort()
        raise
