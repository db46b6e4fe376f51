"""Opening a source for a load: its files through its :class:`~._store.Store`, the cache tier
for what is streamed, and the model's identity.

    /path/to/model            a local directory, .safetensors file or index, or .gguf file
    hf://org/name[@revision]  the Hugging Face hub cache, downloaded into first if needed
    s3://bucket/prefix        an S3(-compatible) prefix holding the model's files
                              (ZEROSTART_OFFLINE=1: use a complete cached copy without asking)
    https://host/path         a URL under which the Hugging Face file names can be fetched

Stores with a local directory (local paths, the hub cache) are loaded from it. The others
stream: headers first, then concurrent ranged reads into the load's arena (or staging), with
every byte also written to the local cache tier (:mod:`._cache`) so the next cold start reads
from disk. A source already complete in the cache (and unchanged remotely) is read from there.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

from zerostart.names import Scheme, source_scheme
from zerostart.weights._cache import BlobWriter, Cache
from zerostart.weights._checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, resolve
from zerostart.weights._errors import CacheFull, SourceError, WeightsError
from zerostart.weights._format import Header, parse_header, read_header
from zerostart.weights._gguf import GgufModel, is_gguf, open_gguf
from zerostart.weights._store import ObjectInfo, Store, digest, fetch
from zerostart.weights._store_hf import HfStore, hub_cache, offline


def open_store(spec: str) -> Store:
    """The store of a source, by its scheme (``zerostart.names.Scheme``)."""
    try:
        scheme = source_scheme(spec)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    return store_module(scheme).open_store(spec)


def store_module(scheme: Scheme) -> ModuleType:
    """The module implementing ``scheme``: ``zerostart.weights._store_<scheme>``, imported by
    name when a source of that scheme is opened (an S3 source's signing library only then)."""
    return importlib.import_module(f"zerostart.weights._store_{scheme.value}")


@dataclass
class Opened:
    """A checkpoint ready to load, with, per file, where its bytes come from."""

    checkpoint: Checkpoint | None  # safetensors files (None for a GGUF file)
    remote: list[ObjectInfo | None] = field(default_factory=list)  # per header: None = local file
    writers: list[BlobWriter | None] = field(default_factory=list)  # per header: cache tee
    source: str = ""
    objects: list[ObjectInfo] = field(default_factory=list)
    cache: Cache | None = None
    local_dir: str | None = None  # where the model's other files (config, tokenizer) are
    store: Store | None = None  # the load's own connections (closed by finish)
    gguf: GgufModel | None = None
    committed: threading.Thread | None = None  # the background cache commit, once started

    def finish(self, ok: bool) -> None:
        """After the load: publish complete cache blobs and the snapshot, or abandon them.

        The tensors are in place already; flushing the cache copy to disk (fsync, rename,
        link) goes on in a background thread so the load does not wait for the disk. The
        thread is not a daemon: the process finishes the cache copy before it exits."""
        if self.store is not None:
            self.store.close()
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
        if self.committed is not None:
            self.committed.join()


def open_source(spec: str | os.PathLike[str], cache: Cache | None = None, use_cache: bool = True,
                log: Callable[[str], None] | None = None) -> Opened:
    spec = os.fspath(spec)
    store = open_store(spec)
    local = store.local_dir()
    if local is not None:
        store.close()
        return _open_local(spec if source_scheme(spec) is Scheme.LOCAL else local)
    cache = cache or (Cache() if use_cache else None)
    try:
        opened = _open_remote(spec, store, cache, log or _warn)
    except BaseException:
        store.close()
        raise
    if opened.store is None:  # served from the cache: no more requests
        store.close()
    return opened


def _open_local(path: str) -> Opened:
    g = gguf_file(path)
    if g is not None:
        model = open_gguf(g)
        return Opened(None, source=path, local_dir=model.dir, gguf=model)
    ck = resolve(path)
    return Opened(ck, [None] * len(ck.headers), [None] * len(ck.headers), source=path, local_dir=_dir_of(path))


def gguf_file(path: str) -> str | None:
    """The GGUF file ``path`` names: itself, or the one .gguf of a directory without safetensors."""
    if os.path.isfile(path):
        return path if is_gguf(path) else None
    if os.path.isdir(path):
        names = os.listdir(path)
        ggufs = [n for n in names if n.endswith(".gguf")]
        if len(ggufs) == 1 and not any(n.endswith(".safetensors") for n in names):
            return os.path.join(path, ggufs[0])
    return None


def _open_remote(spec: str, store: Store, cache: Cache | None, say: Callable[[str], None]) -> Opened:
    if os.environ.get("ZEROSTART_OFFLINE") == "1" and cache is not None and cache.manifest(spec) is not None:
        return _local(cache, spec)  # told not to ask the network: the complete cached copy
    try:
        objects = store.list()
    except SourceError as e:
        m = cache.manifest(spec) if cache else None
        if cache is None or m is None or "access denied" in str(e) or "not found" in str(e):
            raise
        say(f"zerostart: {spec} is unreachable ({e}); loading the cached copy")
        return _local(cache, spec)
    if cache is not None:
        m = cache.manifest(spec)
        if m is not None and _same(m, objects):
            cache.touch(spec)
            return _local(cache, spec)
    weights = weight_objects(spec, objects, store)
    small = [o for o in objects if not o.name.endswith(".safetensors")]
    local_dir = fetch_small(spec, small, cache, store) if cache is not None else None
    headers, remote, writers = _remote_headers(weights, store, cache, say)
    index = next((o for o in objects if o.name == INDEX_NAME), None)
    if index is not None:
        _check_index(spec, json.loads(fetch(store, index)), weights, headers)
    return Opened(Checkpoint(spec, tuple(headers)), remote, writers, spec,
                  [o for o in objects if o.name.endswith(".safetensors")] + small, cache, local_dir, store)


def _remote_headers(weights: list[ObjectInfo], store: Store, cache: Cache | None, say: Callable[[str], None]):
    """Per weight file: its header, where its bytes come from (None: the cache has it now) and
    the cache writer its bytes are teed into."""
    headers: list[Header] = []
    writers: list[BlobWriter | None] = []
    remote: list[ObjectInfo | None] = []
    try:
        for obj in weights:
            raw = _header_bytes(obj, store)
            headers.append(parse_header(raw, file_size=obj.size, path=obj.url))
            w = None
            if cache is not None:
                try:
                    w = cache.open_writer(obj)  # waits while another load downloads this object
                except CacheFull as e:
                    say(f"zerostart: not caching {obj.url}: {e}")
                if w is None and os.path.exists(cache.blob_path(obj)):  # downloaded by someone else meanwhile
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
    return headers, remote, writers


def localize(spec: str | os.PathLike[str], cache: Cache | None = None) -> str:
    """A local directory holding the model's configuration and tokenizer files.

    Local paths are returned as they are; a GGUF file gives its Hugging Face layout in the
    cache; ``hf://`` the hub cache's snapshot (downloaded first if needed); for streamed
    sources the small files are fetched into the cache (weights stream separately at load time).
    """
    spec = os.fspath(spec)
    store = open_store(spec)
    try:
        local = store.local_dir()
        if local is not None:
            path = spec if source_scheme(spec) is Scheme.LOCAL else local
            g = gguf_file(path)
            return open_gguf(g).dir if g is not None else _dir_of(path)
        cache = cache or Cache()
        if cache.manifest(spec) is not None:
            return cache.snapshot_dir(spec)
        try:
            return fetch_small(spec, [o for o in store.list() if not o.name.endswith(".safetensors")], cache, store)
        except SourceError:
            if os.path.isdir(cache.snapshot_dir(spec)):
                return cache.snapshot_dir(spec)
            raise
    finally:
        store.close()


def local_copy(spec: str, cache: Cache | None = None) -> str | None:
    """Where a source's checkpoint can be read on this machine without the network: a local
    path itself, the hub cache's whole snapshot of ``hf://``, the cache's complete copy of a
    streamed source; None when there is none yet."""
    scheme = source_scheme(spec)
    if scheme is Scheme.LOCAL:
        return spec
    if scheme is Scheme.HF:
        return HfStore(spec).cached()
    cache = cache or Cache()
    return cache.snapshot_dir(spec) if cache.manifest(spec) is not None else None


def unreachable(spec: str) -> str | None:
    """Why a source can be neither read on this machine nor fetched now, found without the
    network: an ``hf://`` model missing from the hub cache while ``HF_HUB_OFFLINE`` is set (its
    first load could only fail). None when nothing says so."""
    if source_scheme(spec) is not Scheme.HF:
        return None
    if not offline() or HfStore(spec).cached() is not None:
        return None
    return (f"{spec} is not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE is set: download it with "
            f"the network on (zerostart pull {spec}), or unset HF_HUB_OFFLINE")


def identity(spec: str | os.PathLike[str], cache: Cache | None = None) -> str:
    """What the source's model files are, as a digest that changes when any byte of them may
    have (sizes, times and inodes locally, content hashes and ETags elsewhere). Offline, or
    with the source unreachable, a remote source's cached copy stands for it."""
    spec = os.fspath(spec)
    store = open_store(spec)
    try:
        if store.local_dir() is not None:
            return store.identity()
        cache = cache or Cache()
        m = cache.manifest(spec)
        if m is not None and os.environ.get("ZEROSTART_OFFLINE") == "1":
            return _manifest_identity(spec, m)
        try:
            return store.identity()
        except SourceError:
            if m is None:
                raise
            return _manifest_identity(spec, m)
    finally:
        store.close()


def _manifest_identity(spec: str, manifest: dict) -> str:
    objs = [ObjectInfo(o["url"], o["size"], o.get("etag"), o.get("last_modified")) for o in manifest["objects"].values()]
    return digest(objs, spec.rstrip("/"))


def fetch_small(spec: str, objects: list[ObjectInfo], cache: Cache, store: Store) -> str:
    """Download a source's small files (config, tokenizer, index) into its cache snapshot."""
    for obj in objects:
        w = cache.open_writer(obj)
        if w is not None:
            w.write(0, memoryview(fetch(store, obj)))
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
    return Opened(ck, [None] * len(ck.headers), [None] * len(ck.headers), source=spec, local_dir=d)


def _same(manifest: dict, objects: list[ObjectInfo]) -> bool:
    have = manifest.get("objects", {})
    for o in objects:
        m = have.get(o.name)
        if m is None or m["size"] != o.size or (m.get("etag") or None) != (o.etag or None):
            return False
    return True


def weight_objects(spec: str, objects: list[ObjectInfo], store: Store) -> list[ObjectInfo]:
    """The safetensors files of a listed source, in load order (its index's shards, or the one file)."""
    by_name = {o.name: o for o in objects}
    if INDEX_NAME in by_name:
        index = json.loads(fetch(store, by_name[INDEX_NAME]))
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



def _check_index(spec: str, index: dict, objs: list[ObjectInfo], headers: list[Header]) -> None:
    by_shard = {o.name: h for o, h in zip(objs, headers)}
    for name, shard in index["weight_map"].items():
        if name not in by_shard[shard].tensors:
            raise WeightsError(f"{spec}/{INDEX_NAME}: tensor {name!r} is absent from the shard it names ({shard})")


def _header_bytes(obj: ObjectInfo, store: Store) -> bytes:
    if obj.size < 8:
        raise WeightsError(f"{obj.url}: truncated file ({obj.size} bytes; a safetensors file starts with an 8-byte header length)")
    first = min(obj.size, 1 << 16)
    buf = bytearray(first)
    store.read_range(obj, 0, memoryview(buf))
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > obj.size:
        parse_header(bytes(buf), file_size=obj.size, path=obj.url)  # raises the precise error
    if 8 + n > first:
        rest = bytearray(8 + n - first)
        store.read_range(obj, first, memoryview(rest))
        buf += rest
    return bytes(buf[: 8 + n])


def _dir_of(spec: str) -> str:
    return spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)
