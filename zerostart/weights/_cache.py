"""The local cache tier for remote checkpoints.

    <cache_dir>/sources/
      blobs/<key>              one remote object's bytes; key = sha256(url, ETag, size)
      blobs/<key>.partial      being written (never read as a blob)
      blobs/<key>.lock         held (flock) by the one process writing or reading the blob
      snapshots/<id>/          one source (an s3:// prefix or URL): its file names as links to
                               blobs, source.json (objects, ETags, sizes) and, written last,
                               .complete

A blob becomes visible only by an atomic rename after every byte range was written and the
size checked; a snapshot counts only with its ``.complete`` marker. Blobs are evicted least
recently used first when the cache is over its size cap, never while a load holds them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from zerostart.weights._errors import CacheFull
from zerostart.weights._paths import cache_dir
from zerostart.weights._store import ObjectInfo

DEFAULT_MAX_BYTES = 100 * 10**9  # ZEROSTART_CACHE_MAX_BYTES (or the server config) overrides


def _key(obj: ObjectInfo) -> str:
    return hashlib.sha256(f"{obj.url}\n{obj.etag or obj.last_modified or ''}\n{obj.size}".encode()).hexdigest()


def _source_id(source: str) -> str:
    return hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:24]


@dataclass
class Entry:
    source: str
    path: str  # the snapshot directory
    bytes: int
    files: int
    complete: bool
    last_used: float


class Cache:
    def __init__(self, root: str | None = None, max_bytes: int | None = None) -> None:
        self.root = os.path.join(root or cache_dir(), "sources")
        env = os.environ.get("ZEROSTART_CACHE_MAX_BYTES")
        self.max_bytes = max_bytes if max_bytes is not None else (int(env) if env else DEFAULT_MAX_BYTES)
        self.blobs = os.path.join(self.root, "blobs")
        self.snapshots = os.path.join(self.root, "snapshots")

    # --- lookup ---------------------------------------------------------------------------------

    def snapshot_dir(self, source: str) -> str:
        return os.path.join(self.snapshots, _source_id(source))

    def blob_path(self, obj: ObjectInfo) -> str:
        return os.path.join(self.blobs, _key(obj))

    def manifest(self, source: str) -> dict | None:
        """The recorded objects of a complete snapshot of ``source``, or None."""
        d = self.snapshot_dir(source)
        if not os.path.exists(os.path.join(d, ".complete")):
            return None
        try:
            with open(os.path.join(d, "source.json")) as f:
                m = json.load(f)
        except (OSError, ValueError):
            return None
        for name, o in m.get("objects", {}).items():
            p = os.path.join(d, name)
            if not os.path.exists(p) or os.path.getsize(p) != o["size"]:
                return None  # a blob was evicted or damaged: the snapshot is no longer whole
        return m

    def touch(self, source: str) -> None:
        """Mark a snapshot's blobs used now (LRU)."""
        d = self.snapshot_dir(source)
        now = time.time()
        for name in os.listdir(d) if os.path.isdir(d) else []:
            p = os.path.join(d, name)
            if os.path.islink(p):
                try:
                    os.utime(os.path.realpath(p), (now, now))
                except FileNotFoundError:
                    pass

    # --- writing --------------------------------------------------------------------------------

    def open_writer(self, obj: ObjectInfo, wait: bool = True) -> "BlobWriter | None":
        """A writer for ``obj``'s blob, or None if the blob already exists. Blocks while another
        process or thread writes the same blob (so concurrent loads share one transfer), then
        returns None if that one finished it. Raises CacheFull if the bytes cannot fit."""
        os.makedirs(self.blobs, exist_ok=True)
        path = self.blob_path(obj)
        if os.path.exists(path):
            return None
        lock = open(path + ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            lock.close()
            raise
        if os.path.exists(path):  # another writer finished it while we waited
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
            return None
        try:
            self._make_room(obj.size)
            return BlobWriter(obj, path, lock)
        except BaseException:
            if not lock.closed:  # (a failed BlobWriter already let go of it)
                fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()
            raise

    def link(self, source: str, objects: Iterable[ObjectInfo], complete: bool = True) -> str:
        """Record a snapshot of ``source`` whose blobs all exist; mark it complete last.
        Concurrent callers (threads or processes) are serialized on the snapshot's lock."""
        d = self.snapshot_dir(source)
        os.makedirs(d, exist_ok=True)
        with open(d + ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._link(d, source, list(objects), complete)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return d

    def _link(self, d: str, source: str, objects: list[ObjectInfo], complete: bool) -> None:
        marker = os.path.join(d, ".complete")
        old = None
        try:
            with open(os.path.join(d, "source.json")) as f:
                old = json.load(f)
        except (OSError, ValueError):
            pass
        manifest: dict[str, Any] = {"source": source.rstrip("/"), "created": time.time(), "objects": {}}
        if old is not None and old.get("source") == manifest["source"]:
            manifest["objects"].update(old.get("objects", {}))  # keep files linked earlier
        if os.path.exists(marker) and not complete:
            return  # already whole: a partial update (small files only) changes nothing
        for obj in objects:
            blob = self.blob_path(obj)
            if not os.path.exists(blob):
                raise FileNotFoundError(f"cache blob for {obj.url} is missing")
            link = os.path.join(d, obj.name)
            tmp = f"{link}.tmp-link-{os.getpid()}-{threading.get_ident()}"
            os.symlink(os.path.relpath(blob, d), tmp)
            os.replace(tmp, link)
            manifest["objects"][obj.name] = {"url": obj.url, "size": obj.size, "etag": obj.etag, "last_modified": obj.last_modified}
        tmp = os.path.join(d, f"source.json.tmp-{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(d, "source.json"))
        if complete:
            with open(marker, "w") as f:
                f.write("complete\n")

    # --- housekeeping -------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        if not os.path.isdir(self.snapshots):
            return out
        for d in self._snapshot_dirs():
            try:
                with open(os.path.join(d, "source.json")) as f:
                    m = json.load(f)
            except (OSError, ValueError):
                continue
            objs = m.get("objects", {})
            blobs = [os.path.realpath(os.path.join(d, n)) for n in objs]
            used = max((os.path.getmtime(b) for b in blobs if os.path.exists(b)), default=0.0)
            out.append(Entry(m.get("source", "?"), d, sum(o["size"] for o in objs.values()), len(objs),
                             self.manifest(m.get("source", "")) is not None, used))
        return out

    def _snapshot_dirs(self) -> list[str]:
        if not os.path.isdir(self.snapshots):
            return []
        return [p for p in (os.path.join(self.snapshots, n) for n in sorted(os.listdir(self.snapshots))) if os.path.isdir(p)]

    def total_bytes(self) -> int:
        if not os.path.isdir(self.blobs):
            return 0
        return sum(os.path.getsize(os.path.join(self.blobs, b)) for b in os.listdir(self.blobs)
                   if not b.endswith((".lock", ".partial")))

    def remove(self, source: str) -> int:
        """Remove a source's snapshot and the blobs no other snapshot uses. Returns bytes freed."""
        d = self.snapshot_dir(source)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{source} is not in the cache ({self.root})")
        shutil.rmtree(d)
        if os.path.exists(d + ".lock"):
            os.unlink(d + ".lock")
        return self._drop_unreferenced()

    def gc(self, max_bytes: int | None = None) -> int:
        """Evict least recently used blobs until the cache fits ``max_bytes`` (default: its cap);
        also drop orphaned blobs and stale partial files. Returns bytes freed."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        freed = self._drop_unreferenced()
        if not os.path.isdir(self.blobs):
            return freed
        blobs = [os.path.join(self.blobs, b) for b in os.listdir(self.blobs) if not b.endswith((".lock", ".partial"))]
        blobs.sort(key=os.path.getmtime)
        total = sum(os.path.getsize(b) for b in blobs)
        for b in blobs:
            if total <= cap:
                break
            size = os.path.getsize(b)
            if self._try_delete(b):
                total -= size
                freed += size
        self._invalidate_broken_snapshots()
        return freed

    def _make_room(self, incoming: int) -> None:
        if incoming > self.max_bytes:
            raise CacheFull(errno.ENOSPC, f"{incoming} bytes exceed the cache's {self.max_bytes}-byte cap")
        if self.total_bytes() + incoming > self.max_bytes:
            self.gc(self.max_bytes - incoming)

    def _try_delete(self, blob: str) -> bool:
        try:
            with open(blob + ".lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use by a load: keep it
                os.unlink(blob)
                fcntl.flock(lock, fcntl.LOCK_UN)
            os.unlink(blob + ".lock")
            return True
        except (BlockingIOError, FileNotFoundError):
            return False

    def _drop_unreferenced(self) -> int:
        if not os.path.isdir(self.blobs):
            return 0
        used = set()
        if os.path.isdir(self.snapshots):
            for d in self._snapshot_dirs():
                for n in os.listdir(d):
                    p = os.path.join(d, n)
                    if os.path.islink(p):
                        used.add(os.path.basename(os.path.realpath(p)))
        freed = 0
        now = time.time()
        for b in os.listdir(self.blobs):
            p = os.path.join(self.blobs, b)
            if b.endswith(".lock"):
                continue
            stale_partial = b.endswith(".partial") and now - os.path.getmtime(p) > 3600 and self._unlocked(p[: -len(".partial")])
            if (b.endswith(".partial") and stale_partial) or (not b.endswith(".partial") and b not in used):
                size = os.path.getsize(p)
                if b.endswith(".partial"):
                    os.unlink(p)
                    freed += size
                elif self._try_delete(p):
                    freed += size
        return freed

    def _unlocked(self, blob: str) -> bool:
        try:
            with open(blob + ".lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock, fcntl.LOCK_UN)
            return True
        except BlockingIOError:
            return False

    def _invalidate_broken_snapshots(self) -> None:
        for d in self._snapshot_dirs():
            for n in os.listdir(d):
                p = os.path.join(d, n)
                if os.path.islink(p) and not os.path.exists(p):
                    marker = os.path.join(d, ".complete")
                    if os.path.exists(marker):
                        os.unlink(marker)
                    break


class BlobWriter:
    """Receives an object's byte ranges in any order (from many threads) and turns into a
    blob only when every byte arrived. A failed write (disk full) abandons the blob quietly:
    the load that feeds it goes on."""

    def __init__(self, obj: ObjectInfo, path: str, lock) -> None:
        self.obj = obj
        self.path = path
        self.partial = path + ".partial"
        self._lock_file = lock
        self._mutex = threading.Lock()
        self._ranges: list[tuple[int, int]] = []
        self.error: OSError | None = None
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if obj.size and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self.fd, 0, obj.size)  # fail now, not halfway, if the disk is full
        except OSError as e:
            os.close(self.fd)
            os.unlink(self.partial)
            self._unlock()
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise CacheFull(e.errno, f"no room in the cache for {obj.url} ({obj.size} bytes): {e.strerror}") from None
            raise

    def write(self, offset: int, data: memoryview) -> None:
        if self.error is not None:
            return
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as e:
            self.error = e
            return
        with self._mutex:
            self._ranges.append((offset, offset + len(data)))

    def covered(self) -> bool:
        end = 0
        for a, b in sorted(self._ranges):
            if a > end:
                return False
            end = max(end, b)
        return end >= self.obj.size

    def commit(self) -> bool:
        """Publish the blob if complete and intact; else abandon it. Returns True if published."""
        ok = self.error is None and self.covered()
        try:
            if ok:
                os.fsync(self.fd)
                ok = os.fstat(self.fd).st_size == self.obj.size
        except OSError as e:
            self.error, ok = e, False
        os.close(self.fd)
        if ok:
            os.replace(self.partial, self.path)
        else:
            try:
                os.unlink(self.partial)
            except FileNotFoundError:
                pass
        self._unlock()
        return ok

    def abort(self) -> None:
        self.error = self.error or OSError(errno.ECANCELED, "aborted")
        self.commit()

    def _unlock(self) -> None:
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
