"""Where a model's files live, behind one interface: a :class:`Store` per source scheme.

    local   /path/to/model, /path/to/file.safetensors, /path/to/model.gguf   (_store_local.py)
    hf      hf://org/name[@revision]: the Hugging Face hub cache, downloading  (_store_hf.py)
            into it what is missing
    s3      s3://bucket/prefix                                               (_store_s3.py)
    http    http(s)://host/path, under which the Hugging Face file names are (_store_http.py)

A store lists the files a model needs, states one, reads byte ranges of one, and names the
content of them all (:meth:`Store.identity`: it changes whenever any of their bytes may have).
Stores that hold the files on this machine (local, hf) also give their directory; the others
are streamed (:mod:`._sources`). The registry is ``zerostart.names.Scheme``: a scheme ``x``
is served by the module ``zerostart.weights._store_x``, whose ``open_store(spec)`` returns
its :class:`Store` (``_sources.open_store`` finds it by name). A new scheme (``gs://``,
Azure) is one file here and one entry there.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable


# The files a model needs: weights (safetensors shards and their index, or one GGUF file),
# its config, tokenizer and chat templates. Everything else in a repository is left alone.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "model.safetensors",
               "model.safetensors.index.json", "zerostart-image.json", "zerostart-checksums.json")
MODEL_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "additional_chat_templates/*.jinja") + tuple(
    n for n in MODEL_FILES if not n.endswith(".safetensors"))


def is_model_file(name: str) -> bool:
    """Whether a file (by its name in the model's directory) is one a model needs."""
    return any(fnmatch.fnmatchcase(name, p) for p in MODEL_PATTERNS)


@dataclass(frozen=True)
class ObjectInfo:
    """One file of a source: where it is, how big, and what identifies its bytes."""

    url: str  # canonical: an absolute path, s3://bucket/key or http(s)://host/path
    size: int
    etag: str | None = None  # a content identity: ETag, the hub's sha256, or size+mtime+inode locally
    last_modified: str | None = None

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@runtime_checkable
class Store(Protocol):
    """A source's files. ``read_range`` may be called from many threads at once."""

    spec: str  # the source as the user named it

    def list(self) -> list[ObjectInfo]:
        """The files of the model (those it needs), each with its size and identity."""
        ...

    def stat(self, name: str) -> ObjectInfo:
        """One file by name; ``SourceError`` or ``WeightsError`` naming it if absent."""
        ...

    def read_range(self, obj: ObjectInfo, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the object's bytes from ``offset`` (up to the end of the object)."""
        ...

    def identity(self) -> str:
        """A digest of what the model's bytes are; any change to them changes it."""
        ...

    def local_dir(self) -> str | None:
        """A directory on this machine holding the files (None: the store is read remotely)."""
        ...

    def close(self) -> None:
        """Release connections (the store may not be used afterwards)."""
        ...


def digest(objects: Iterable[ObjectInfo], *extra: str) -> str:
    """An identity from objects' names, sizes and content identities (order-independent)."""
    rows = sorted((o.name, o.size, o.etag or o.last_modified or "") for o in objects)
    return hashlib.sha256(json.dumps([rows, list(extra)]).encode()).hexdigest()[:32]


def fetch(store: Store, obj: ObjectInfo) -> bytes:
    """A whole (small) object's bytes."""
    buf = bytearray(obj.size)
    if obj.size:
        store.read_range(obj, 0, memoryview(buf))
    return bytes(buf)
