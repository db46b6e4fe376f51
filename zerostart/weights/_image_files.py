"""Every file of a ready image covered by its manifest: the table of their sizes and checksums
written with it (:func:`seal`), and checked before anything of the image is read
(:func:`verify_files`, from ``read_manifest``)::

    "files": {"tokenizer.json": {"bytes": 2104556, "xxh3_64": "<16 hex>"},
              "model.safetensors": {"bytes": ..., "xxh3_64": "<its header's>", "hashed_bytes": <data_start>},
              "additional_chat_templates/tool_use.jinja": {...}, ...},
    "manifest_xxh3_64": "<16 hex>"     the manifest's own canonical JSON without this key

The weights file's data section is not hashed here: its 4 MiB blocks have checksums of their
own (``zerostart-checksums.json``, itself in the table), verified while the weights load.
"""

from __future__ import annotations

import json
import os
from typing import Any

import xxhash

from zerostart.weights._errors import ImageError, ImageIncompatible

MANIFEST = "zerostart-image.json"  # the image's manifest: its fingerprint, tensor table and this file table
_SELF = "manifest_xxh3_64"
_PIECE = 16 << 20  # bytes hashed at a time


def seal(manifest: dict[str, Any], directory: str, weights_file: str, data_start: int) -> None:
    """Add the file table of the image being written in ``directory`` and the manifest's own checksum."""
    manifest["files"] = _file_table(directory, weights_file, data_start)
    manifest[_SELF] = _manifest_digest(manifest)


def verify_files(path: str, m: dict[str, Any]) -> None:
    """Every file of the image as its manifest lists it (size and checksum), and no other;
    the manifest's own checksum. ImageError naming the first file that differs."""
    table = m.get("files")
    if not isinstance(table, dict) or _SELF not in m:
        raise ImageIncompatible(f"{path}: written by an older zerostart, whose manifest does not cover the image's "
                                "other files (tokenizer, configs, chat template): write it again")
    if m[_SELF] != _manifest_digest(m):
        raise ImageError(f"{path}: {MANIFEST} fails its own checksum: the manifest was changed or is corrupt")
    present = _files(path) - {MANIFEST}
    unlisted = sorted(present - set(table))
    if unlisted:
        raise ImageError(f"{path}: {', '.join(unlisted)} not part of the image (its manifest does not list it): "
                         "something changed the image")
    for name, entry in sorted(table.items()):
        file = os.path.join(path, name)
        try:
            if name not in present or not os.path.isfile(file):
                raise ImageError(f"{path}: {name} is missing (its manifest lists it)")
            size = os.path.getsize(file)
            if size != entry["bytes"]:
                raise ImageError(f"{path}: {name} is {size} bytes where its manifest says {entry['bytes']} "
                                 "(truncated or replaced)")
            got = _hash(file, entry.get("hashed_bytes") or size)
        except (KeyError, TypeError) as e:
            raise ImageError(f"{path}: malformed file table in {MANIFEST} ({name}: {e})") from None
        if got != entry["xxh3_64"]:
            what = "its header" if entry.get("hashed_bytes") else "it"
            raise ImageError(f"{path}: {name} fails its checksum ({what} changed since the image was written): "
                             "the image is corrupt or was edited")


def _files(directory: str) -> set[str]:
    """Every entry under ``directory`` but directories, as relative paths with ``/``."""
    out: set[str] = set()
    for root, _, names in os.walk(directory):
        rel = os.path.relpath(root, directory)
        out.update(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}" for name in names)
    return out


def _file_table(directory: str, weights_file: str, data_start: int) -> dict[str, dict[str, Any]]:
    """Size and xxh3 of every file under ``directory`` but the manifest; of the weights file
    only its header is hashed here (its data section has block checksums, verified while it loads)."""
    table: dict[str, dict[str, Any]] = {}
    for name in sorted(_files(directory) - {MANIFEST}):
        file = os.path.join(directory, name)
        if not os.path.isfile(file) or os.path.islink(file):
            raise ImageError(f"{file}: an image holds regular files only")
        size = os.path.getsize(file)
        hashed = data_start if name == weights_file else None
        table[name] = {"bytes": size, "xxh3_64": _hash(file, hashed or size)}
        if hashed:
            table[name]["hashed_bytes"] = hashed
    return table


def _hash(file: str, nbytes: int) -> str:
    """xxh3 of a file's first ``nbytes`` bytes, read in bounded pieces."""
    h = xxhash.xxh3_64()
    with open(file, "rb") as f:
        while nbytes > 0:
            piece = f.read(min(nbytes, _PIECE))
            if not piece:
                break
            h.update(piece)
            nbytes -= len(piece)
    return h.hexdigest()


def _manifest_digest(m: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in m.items() if k != _SELF}, sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_64_hexdigest(canonical.encode())
