"""Per-block checksums of safetensors files, verified while they load.

A directory may carry ``zerostart-checksums.json`` (ready images always do):

    {"algorithm": "xxh3_64", "block_bytes": 4194304,
     "files": {"model.safetensors": {"size": ..., "data_start": ..., "blocks": ["<16 hex>", ...]}}}

Blocks tile each file's data section from ``data_start`` (a multiple of 4096). The load path
hashes every block as soon as its bytes have been read (in the reader thread, overlapped with
the other reads; xxhash releases the GIL) and fails the load on the first mismatch, naming
the file, the block and its byte range.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import xxhash

from zerostart.weights._errors import WeightsError

NAME = "zerostart-checksums.json"
BLOCK_BYTES = 4 << 20


def digest(data: memoryview | bytes) -> str:
    h = xxhash.xxh3_64()
    h.update(data)  # releases the GIL for large inputs
    return h.hexdigest()


@dataclass
class FileSums:
    path: str
    size: int
    data_start: int
    block_bytes: int
    blocks: list[str]

    def block_range(self, i: int) -> tuple[int, int]:
        a = self.data_start + i * self.block_bytes
        return a, min(a + self.block_bytes, self.size)

    def check(self, start: int, data: memoryview) -> int:
        """Verify the blocks wholly inside ``data`` (file bytes from ``start``). Returns the
        number of blocks checked; raises WeightsError on a mismatch."""
        end = start + len(data)
        first = max(0, -(-(start - self.data_start) // self.block_bytes))
        checked = 0
        i = first
        while i < len(self.blocks):
            a, b = self.block_range(i)
            if b > end:
                break
            if a >= start:
                got = digest(data[a - start : b - start])
                if got != self.blocks[i]:
                    raise WeightsError(f"{self.path}: block {i} (bytes {a}..{b}) fails its checksum ({got} != {self.blocks[i]}): "
                                       f"the file is corrupt; rewrite it (zerostart snapshot) or load the source checkpoint")
                checked += 1
            i += 1
        return checked


def compute(path: str, data_start: int, block_bytes: int = BLOCK_BYTES) -> FileSums:
    size = os.path.getsize(path)
    blocks = []
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start)
        while True:
            chunk = f.read(block_bytes)
            if not chunk:
                break
            blocks.append(digest(chunk))
    return FileSums(path, size, data_start, block_bytes, blocks)


def write(directory: str, sums: list[FileSums]) -> str:
    doc = {"algorithm": "xxh3_64", "block_bytes": sums[0].block_bytes if sums else BLOCK_BYTES,
           "files": {os.path.basename(s.path): {"size": s.size, "data_start": s.data_start, "blocks": s.blocks} for s in sums}}
    p = os.path.join(directory, NAME)
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, p)
    return p


def load_for(paths: list[str]) -> dict[str, FileSums] | None:
    """The checksums covering ``paths`` (by file name in their directory), or None if there
    are none. A sidecar that does not match the files is an error: the image is damaged."""
    if not paths:
        return None
    directory = os.path.dirname(os.path.abspath(paths[0]))
    p = os.path.join(directory, NAME)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            doc = json.load(f)
        if doc.get("algorithm") != "xxh3_64":
            raise WeightsError(f"{p}: unknown checksum algorithm {doc.get('algorithm')!r}")
        bb = int(doc["block_bytes"])
        files = doc["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{p}: unreadable checksum file ({e})") from None
    out = {}
    for path in paths:
        name = os.path.basename(path)
        ent = files.get(name)
        if ent is None:
            raise WeightsError(f"{p}: has no checksums for {name}")
        size = os.path.getsize(path)
        if size != ent["size"]:
            raise WeightsError(f"{path}: is {size} bytes but its checksums describe {ent['size']} (truncated or replaced)")
        if ent["data_start"] % 4096:
            raise WeightsError(f"{p}: data_start of {name} is not 4096-aligned")
        out[path] = FileSums(path, size, int(ent["data_start"]), bb, list(ent["blocks"]))
        expected_blocks = -(-(size - out[path].data_start) // bb)
        if len(out[path].blocks) != expected_blocks:
            raise WeightsError(f"{p}: {name} should have {expected_blocks} block checksums, has {len(out[path].blocks)}")
    return out
