"""Where a checkpoint comes from: a local path, the Hugging Face cache, S3 or HTTP.

    /path/to/model            a local file or directory
    hf://org/name[@revision]  a model already in the Hugging Face hub cache (offline; honours
                              HF_HUB_CACHE and HF_HOME)
    s3://bucket/prefix        an S3(-compatible) prefix holding the model's files
                              (ZEROSTART_OFFLINE=1: use a complete cached copy without asking)
    https://host/path         a URL under which the Hugging Face file names can be fetched

Remote sources stream: headers first, then concurrent ranged reads into the load's arena (or
staging), with every byte also written to the local cache tier (:mod:`._cache`) so the next
cold start reads from disk. A source already complete in the cache (and unchanged remotely)
is read from the cache.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

from zerostart.names import Scheme, is_remote, source_scheme
from zerostart.weights._cache import BlobWriter, Cache, CacheFull
from zerostart.weights._checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, resolve
from zerostart.weights._format import Header, WeightsError, parse_header
from zerostart.weights._remote import RemoteObject, SourceError, Transport, fetch, list_objects


def hf_snapshot(spec: str) -> str:
    """The local snapshot directory of ``hf://org/name[@revision]`` in the Hugging Face cache."""
    rest = spec[len("hf://"):]
    repo, _, rev = rest.partition("@")
    if repo.count("/") != 1:
        raise WeightsError(f"{spec}: expected hf://org/name[@revision]")
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    root = os.path.join(hub, "models--" + repo.replace("/", "--"))
    if not os.path.isdir(root):
        raise WeightsError(f"{spec}: not in the Hugging Face cache ({root} does not exist); download it there first "
                           f"(hub downloads are not made by zerostart)")
    rev = rev or "main"
    ref = os.path.join(root, "refs", rev)
    commit = rev
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    snap = os.path.join(root, "snapshots", commit)
    if not os.path.isdir(snap):
        have = ", ".join(sorted(os.listdir(os.path.join(root, "snapshots")))) if os.path.isdir(os.path.join(root, "snapshots")) else "none"
        raise WeightsError(f"{spec}: revision {rev!r} is not in the Hugging Face cache (snapshots: {have})")
    return snap


@dataclass
class Opened:
    """A checkpoint ready to load, with, per file, where its bytes come from."""

    checkpoint: Checkpoint
    remote: list[RemoteObject | None] = field(default_factory=list)  # per header: None = local file
    writers: list[BlobWriter | None] = field(default_factory=list)  # per header: cache tee
    source: str = ""
    objects: list[RemoteObject] = field(default_factory=list)
    cache: Cache | None = None
    local_dir: str | None = None  # where the model's other files (config, tokenizer) are
    transport: Transport | None = None  # the load's own connections (closed by finish)

    def finish(self, ok: bool) -> None:
        """After the load: publish complete cache blobs and the snapshot, or abandon them.

        The tensors are in place already; flushing the cache copy to disk (fsync, rename,
        link) goes on in a background thread so the load does not wait for the disk. The
        thread is not a daemon: the process finishes the cache copy before it exits."""
        if self.transport is not None:
            self.transport.close()
        if not any(self.writers):
            return
        if not ok:
            for w in self.writers:
                if w is not None:
                    w.abort()
            return
        self.committed = threading.Thread(target=self._commit, name="zerostart-cache-commit")
        self.committed.start()

    def _commit(self) -> None:
        for w in self.writers:
            if w is not None:
                w.commit()
        if self.cache is not None and self.objects and all(os.path.exists(self.cache.blob_path(o)) for o in self.objects):
            self.cache.link(self.source, self.objects)

    def wait_cached(self) -> None:
        """Block until the background cache commit (if any) is done."""
        t = getattr(self, "committed", None)
        if t is not None:
            t.join()


def open_source(spec: str | os.PathLike[str], cache: Cache | None = None, transport: Transport | None = None,
                use_cache: bool = True, log: Callable[[str], None] | None = None) -> Opened:
    spec = os.fspath(spec)
    if source_scheme(spec) is Scheme.HF:
        spec = hf_snapshot(spec)
    if not is_remote(spec):
        ck = resolve(spec)
        return Opened(ck, [None] * len(ck.headers), [None] * len(ck.headers), local_dir=_dir_of(spec))
    t = transport or Transport()
    cache = cache or (Cache() if use_cache else None)
    say = log or _warn
    try:
        opened = _open_remote(spec, cache, t, say)
    except BaseException:
        t.close()
        raise
    if opened.transport is None:  # served from the cache: no more requests
        t.close()
    return opened


def _open_remote(spec: str, cache: Cache | None, t: Transport, say: Callable[[str], None]) -> Opened:
    if os.environ.get("ZEROSTART_OFFLINE") == "1" and cache is not None and cache.manifest(spec) is not None:
        return _local(cache, spec)  # told not to ask the network: the complete cached copy
    try:
        objects = list_objects(spec, t)
    except SourceError as e:
        m = cache.manifest(spec) if cache else None
        if m is None or "access denied" in str(e) or "not found" in str(e):
            raise
        say(f"zerostart: {spec} is unreachable ({e}); loading the cached copy")
        return _local(cache, spec)
    if cache is not None:
        m = cache.manifest(spec)
        if m is not None and _same(m, objects):
            cache.touch(spec)
            return _local(cache, spec)
    weights = _weight_objects(spec, objects, t)
    small = [o for o in objects if not o.name.endswith(".safetensors")]
    local_dir = fetch_small(spec, small, cache, t) if cache is not None else None
    headers: list[Header] = []
    writers: list[BlobWriter | None] = []
    remote: list[RemoteObject | None] = []
    try:
        for obj in weights:
            raw = _header_bytes(obj, t)
            headers.append(parse_header(raw, file_size=obj.size, path=obj.url))
            w = None
            if cache is not None:
                try:
                    w = cache.open_writer(obj)  # waits while another load downloads this object
                except CacheFull as e:
                    say(f"zerostart: not caching {obj.url}: {e}")
                if w is None and os.path.exists(cache.blob_path(obj)):
                    # someone else downloaded it meanwhile: read the local copy
                    from zerostart.weights._format import read_header

                    headers[-1] = read_header(cache.blob_path(obj))
                    remote.append(None)
                    writers.append(None)
                    continue
                if w is not None:
                    w.write(0, memoryview(raw))
            remote.append(obj)
            writers.append(w)
    except BaseException:
        for w in writers:
            if w is not None:
                w.abort()
        raise
    index = next((o for o in objects if o.name == INDEX_NAME), None)
    ck = Checkpoint(spec, tuple(headers))
    if index is not None:
        _check_index(spec, json.loads(fetch(index, t)), weights, headers)
    return Opened(ck, remote, writers, spec, [o for o in objects if o.name.endswith(".safetensors")] + small, cache, local_dir, t)


def localize(spec: str | os.PathLike[str], cache: Cache | None = None, transport: Transport | None = None) -> str:
    """A local directory holding the model's configuration and tokenizer files.

    Local paths and Hugging Face cache entries are returned as they are; for remote sources
    the small files are fetched into the cache (weights stream separately at load time).
    """
    spec = os.fspath(spec)
    if source_scheme(spec) is Scheme.HF:
        return hf_snapshot(spec)
    if not is_remote(spec):
        return _dir_of(spec)
    cache = cache or Cache()
    m = cache.manifest(spec)
    if m is not None and os.environ.get("ZEROSTART_OFFLINE") == "1":
        return cache.snapshot_dir(spec)
    if m is not None:
        return cache.snapshot_dir(spec)
    t = transport or Transport()
    try:
        objects = list_objects(spec, t)
        return fetch_small(spec, [o for o in objects if not o.name.endswith(".safetensors")], cache, t)
    except SourceError:
        if os.path.isdir(cache.snapshot_dir(spec)):
            return cache.snapshot_dir(spec)
        raise
    finally:
        if transport is None:
            t.close()


def fetch_small(spec: str, objects: list[RemoteObject], cache: Cache, t: Transport) -> str:
    """Download a source's small files (config, tokenizer, index) into its cache snapshot."""
    for obj in objects:
        w = cache.open_writer(obj)
        if w is not None:
            w.write(0, memoryview(fetch(obj, t)))
            if not w.commit():
                raise SourceError(f"{obj.url}: could not be written to the cache at {cache.root}")
    d = cache.snapshot_dir(spec)
    complete = cache.manifest(spec) is not None
    if not complete:
        cache.link(spec, objects, complete=False)
    return d


def _local(cache: Cache, spec: str) -> Opened:
    d = cache.snapshot_dir(spec)
    ck = resolve(d)
    return Opened(ck, [None] * len(ck.headers), [None] * len(ck.headers), local_dir=d)


def _same(manifest: dict, objects: list[RemoteObject]) -> bool:
    have = manifest.get("objects", {})
    for o in objects:
        m = have.get(o.name)
        if m is None or m["size"] != o.size or (m.get("etag") or None) != (o.etag or None):
            return False
    return True


def _weight_objects(spec: str, objects: list[RemoteObject], t: Transport) -> list[RemoteObject]:
    by_name = {o.name: o for o in objects}
    if INDEX_NAME in by_name:
        index = json.loads(fetch(by_name[INDEX_NAME], t))
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict):
            raise WeightsError(f"{spec}/{INDEX_NAME}: missing or malformed 'weight_map'")
        out = []
        for shard in dict.fromkeys(wm.values()):
            if shard not in by_name:
                raise WeightsError(f"{spec}/{INDEX_NAME}: names shard {shard!r}, which is missing from {spec}")
            out.append(by_name[shard])
        return out
    if SINGLE_NAME in by_name:
        return [by_name[SINGLE_NAME]]
    st = [o for o in objects if o.name.endswith(".safetensors")]
    if len(st) == 1:
        return st
    raise WeightsError(f"{spec}: no {SINGLE_NAME} or {INDEX_NAME} there (found: {', '.join(sorted(by_name)) or 'nothing'})")


def _check_index(spec: str, index: dict, objs: list[RemoteObject], headers: list[Header]) -> None:
    by_shard = {o.name: h for o, h in zip(objs, headers)}
    for name, shard in index["weight_map"].items():
        if name not in by_shard[shard].tensors:
            raise WeightsError(f"{spec}/{INDEX_NAME}: tensor {name!r} is absent from the shard it names ({shard})")


def _header_bytes(obj: RemoteObject, t: Transport) -> bytes:
    if obj.size < 8:
        raise WeightsError(f"{obj.url}: truncated file ({obj.size} bytes; a safetensors file starts with an 8-byte header length)")
    first = min(obj.size, 1 << 16)
    buf = bytearray(first)
    t.read_range(obj, 0, memoryview(buf))
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > obj.size:
        parse_header(bytes(buf), file_size=obj.size, path=obj.url)  # raises the precise error
    if 8 + n > first:
        rest = bytearray(8 + n - first)
        t.read_range(obj, first, memoryview(rest))
        buf += rest
    return bytes(buf[: 8 + n])


def _dir_of(spec: str) -> str:
    return spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def pull(spec: str, cache: Cache | None = None, transport: Transport | None = None, concurrency: int = 16,
         part_bytes: int = 16 << 20, progress: Callable[[int, int], None] | None = None) -> str:
    """Download every file of a remote source into the cache (ranged, concurrent, resumable by
    object) and return its snapshot directory. Objects already cached are not fetched again."""
    from concurrent.futures import ThreadPoolExecutor
    import threading

    if not is_remote(spec):
        raise WeightsError(f"{spec}: only s3:// and http(s):// sources are pulled into the cache")
    cache = cache or Cache()
    t = transport or Transport()
    try:
        return _pull(spec, cache, t, concurrency, part_bytes, progress)
    finally:
        if transport is None:
            t.close()


def _pull(spec: str, cache: Cache, t: Transport, concurrency: int, part_bytes: int,
          progress: Callable[[int, int], None] | None) -> str:
    from concurrent.futures import ThreadPoolExecutor
    import threading

    objects = list_objects(spec, t)
    _weight_objects(spec, objects, t)  # fail early on a source that is no checkpoint
    total = sum(o.size for o in objects)
    done = 0
    lock = threading.Lock()
    local = threading.local()

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
        def part(off: int, obj: RemoteObject = obj, w: BlobWriter = w) -> None:
            buf = getattr(local, "buf", None)
            if buf is None or len(buf) < part_bytes:
                buf = local.buf = bytearray(part_bytes)
            n = min(part_bytes, obj.size - off)
            mv = memoryview(buf)[:n]
            t.read_range(obj, off, mv)
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
        if not w.commit():
            raise SourceError(f"{obj.url}: downloaded bytes did not add up to {obj.size}; nothing was cached")
    return cache.link(spec, objects)
