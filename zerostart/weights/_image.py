"""Ready images: a model's weights exactly as the engine holds them after prepare, restorable
by one sequential, checksummed read. (Written by ``zerostart.snapshot``; read by the engine
through :func:`zerostart.weights.load_arena`, which verifies the checksums.)

An image is a directory:

    model.safetensors         the prepared weights (dtype cast, projections fused) in layer
                              order: embeddings, layer 0, layer 1, ..., final norm, LM head.
                              Within a layer, tensors keep their relative offsets from the
                              engine's arena (so fused groups stay back to back); the data
                              section and every layer start on a 4096-byte boundary. Gaps are
                              filled by ``__zerostart_pad__.N`` tensors (loaded, never returned).
    zerostart-checksums.json  xxh3 of every 4 MiB block, verified while the image loads
    zerostart-image.json      the manifest: format version, fingerprint, source, layer spans
    config.json, tokenizer*.json, generation_config.json, chat templates   (copied)
    compile_cache.bin         torch.compile artifacts, when the engine compiled

It is written into a temporary directory and renamed into place, so a reader sees a whole
image or none; of two concurrent writers of the same image, the first rename wins and the
other discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Any

MANIFEST = "zerostart-image.json"
FORMAT = "zerostart-image"
VERSION = 1
LAYOUT = "hf-names/layer-order/v1"
_ALIGN = 4096
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "chat_template.jinja", "chat_template.json")


class ImageError(ValueError):
    """An image is missing, malformed, corrupt or incompatible; the message says which."""


class ImageIncompatible(ImageError):
    """The image was written for another device, dtype, config or software version."""


@dataclass(frozen=True)
class Fingerprint:
    zerostart: str
    torch: str
    device_type: str
    dtype: str
    config_sha256: str
    layout: str = LAYOUT

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)

    def mismatches(self, other: "Fingerprint") -> list[str]:
        return [f"{k}: image {getattr(other, k)!r}, wanted {getattr(self, k)!r}" for k in self.__dict__
                if getattr(self, k) != getattr(other, k)]


def config_hash(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fingerprint(model_dir: str, device_type: str, dtype: str) -> Fingerprint:
    import torch

    from zerostart import __version__

    return Fingerprint(__version__, torch.__version__.split("+")[0], device_type, str(dtype).removeprefix("torch."),
                       config_hash(model_dir))


def is_image(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict[str, Any]:
    p = os.path.join(path, MANIFEST)
    try:
        with open(p) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ImageError(f"{path}: not a ready image (no {MANIFEST})") from None
    except ValueError as e:
        raise ImageError(f"{p}: unreadable manifest ({e})") from None
    if m.get("format") != FORMAT or not isinstance(m.get("fingerprint"), dict):
        raise ImageError(f"{p}: not a zerostart image manifest")
    if m.get("version") != VERSION:
        raise ImageIncompatible(f"{path}: image format version {m.get('version')} (this zerostart reads {VERSION}); write it again")
    return m


def check_compatible(path: str, wanted: Fingerprint) -> dict[str, Any]:
    """The manifest, if the image at ``path`` matches ``wanted``; else ImageIncompatible."""
    m = read_manifest(path)
    try:
        have = Fingerprint(**m["fingerprint"])
    except TypeError as e:
        raise ImageError(f"{path}: malformed fingerprint ({e})") from None
    bad = wanted.mismatches(have)
    if bad:
        raise ImageIncompatible(f"{path}: image does not match this runtime ({'; '.join(bad)})")
    return m


def _layer_key(name: str) -> tuple[int, int]:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)))
    if "embed" in name:
        return (0, 0)
    if name.startswith("lm_head"):
        return (3, 0)
    return (2, 0)  # final norm and anything else after the layers


def write_image(tensors: dict[str, Any], model_dir: str, out: str, fp: Fingerprint, source: str = "",
                extra: dict[str, Any] | None = None, compile_cache: bytes | None = None) -> str:
    """Write ``tensors`` (views into one arena, as the engine holds them) as a ready image.

    Returns ``out``. If ``out`` appears meanwhile (another writer won), this copy is discarded.
    """
    import torch

    from zerostart.weights import _checksums

    groups: dict[tuple[int, int], list[tuple[str, Any]]] = {}
    for name, t in tensors.items():
        groups.setdefault(_layer_key(name), []).append((name, t))
    # layout: per group, tensors in arena order with their relative offsets kept
    entries: list[tuple[str, Any | None, int, int]] = []  # (name, tensor or None for a pad, start, nbytes)
    offset = 0
    spans: dict[str, list[int]] = {}
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda nt: nt[1].data_ptr())
        offset = _pad_to(entries, offset, (offset + _ALIGN - 1) // _ALIGN * _ALIGN)
        base_ptr = members[0][1].data_ptr()
        group_start = offset
        for name, t in members:
            want = group_start + (t.data_ptr() - base_ptr)  # same relative place as in the arena
            if want < offset or want % t.element_size():  # (overlapping or odd views: pack instead)
                want = (offset + 255) // 256 * 256
            offset = _pad_to(entries, offset, want)
            n = t.numel() * t.element_size()
            entries.append((name, t if t.is_contiguous() else t.contiguous(), offset, n))
            offset += n
        label = f"layer.{key[1]}" if key[0] == 1 else {0: "embed", 2: "final", 3: "head"}[key[0]]
        spans[label] = [group_start, offset]
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "zerostart": "ready-image"}}
    from zerostart.weights._dtypes import SAFETENSORS_NAMES

    for name, t, start, n in entries:
        if t is None:
            header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [start, start + n]}
        else:
            header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [start, start + n]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    data_start = (8 + len(raw) + _ALIGN - 1) // _ALIGN * _ALIGN
    raw += b" " * (data_start - 8 - len(raw))

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        wpath = os.path.join(tmp, "model.safetensors")
        with open(wpath, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            pos = 0
            zeros = bytes(_ALIGN)
            for name, t, start, n in entries:
                if t is None:
                    left = n
                    while left:
                        f.write(zeros[: min(left, len(zeros))])
                        left -= min(left, len(zeros))
                elif n:
                    flat = t.detach().reshape(-1).view(torch.uint8)
                    for i in range(0, n, 64 << 20):
                        f.write(memoryview(flat[i : i + (64 << 20)].to("cpu").numpy()))
                pos = start + n
            f.flush()
            os.fsync(f.fileno())
        assert os.path.getsize(wpath) == data_start + pos
        _checksums.write(tmp, [_checksums.compute(wpath, data_start)])
        for name in _COPY:
            src = os.path.join(model_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        if compile_cache:
            with open(os.path.join(tmp, "compile_cache.bin"), "wb") as f:
                f.write(compile_cache)
        manifest = {
            "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": source, "fingerprint": fp.to_dict(),
            "weights": {"file": "model.safetensors", "bytes": pos, "data_start": data_start,
                        "tensors": sum(1 for e in entries if e[1] is not None), "pad_tensors": sum(1 for e in entries if e[1] is None),
                        "spans": spans},
            "compile_cache": "compile_cache.bin" if compile_cache else None,
        }
        if extra:
            manifest["engine"] = extra
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _fsync_dir(tmp)
        try:
            os.rename(tmp, out)  # atomic; fails if another writer already put an image there
        except OSError:
            if is_image(out):
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            if os.path.isdir(out) and not os.listdir(out):
                os.rmdir(out)
                os.rename(tmp, out)
            else:
                raise ImageError(f"{out}: exists and is not a ready image; choose another --out") from None
        _fsync_dir(parent)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pad_to(entries: list, offset: int, want: int) -> int:
    if want > offset:
        entries.append((f"__zerostart_pad__.{sum(1 for e in entries if e[1] is None)}", None, offset, want - offset))
    return max(offset, want)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def image_store(source: str, fp: Fingerprint, root: str | None = None) -> str:
    """Where the server keeps the image of ``source`` for this fingerprint."""
    from zerostart.names import is_local
    from zerostart.weights import cache_dir

    key = hashlib.sha256(json.dumps([os.path.abspath(source) if is_local(source) else source, fp.to_dict()],
                                    sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(root or os.path.join(cache_dir(), "images"), key)
