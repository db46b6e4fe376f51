"""Ready images: a model's weights exactly as the engine holds them after prepare, restorable
by one sequential, checksummed read. (Written by ``zerostart.snapshot``; read by the engine
through :func:`zerostart.weights.load_arena`, which verifies the checksums.)

An image is a directory:

    model.safetensors         the prepared weights (dtype cast) in layer order: embeddings,
                              layer 0, layer 1, ..., final norm, LM head. Within a layer, the
                              members of each fused group (q/k/v, gate/up, their biases) are
                              back to back in order, so a restored image fuses without moving a
                              byte; the data section and every layer start on a 4096-byte
                              boundary. Gaps are ``__zerostart_pad__.N`` tensors (loaded, never
                              returned).
    zerostart-checksums.json  xxh3 of every 4 MiB block, verified while the image loads
    zerostart-image.json      the manifest: format version, fingerprint (with the quantize
                              setting), source, layer spans, the quantized formats it holds,
                              every other file's size and checksum, and its own checksum
    config.json, tokenizer*.json, generation_config.json, chat templates   (copied)
    compile_cache.bin         torch.compile artifacts, when the engine compiled

Every byte of an image is covered: :func:`read_manifest` verifies the manifest's own checksum
and every file's size and xxh3 (the weights file's header; its data section is verified block
by block while it loads) and refuses a file the manifest does not list, before anything of the
image is read. A manifest without the file table (written by an older zerostart) is
:class:`ImageIncompatible`: the image is written again rather than trusted.

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

from zerostart import __version__
from zerostart.names import is_local
from zerostart.weights import _checksums
from zerostart.weights._errors import ImageError, ImageIncompatible
from zerostart.weights._image_files import MANIFEST, seal, verify_files
from zerostart.weights._paths import cache_dir

FORMAT = "zerostart-image"
VERSION = 1
LAYOUT = "hf-names/layer-order/v1"
_ALIGN = 4096
# what the engine reads of a model directory besides the weights (the tokenizer also reads the
# named templates in additional_chat_templates/)
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "chat_template.jinja", "chat_template.json")
_COPY_DIRS = ("additional_chat_templates",)


@dataclass(frozen=True)
class Fingerprint:
    zerostart: str
    torch: str
    device_type: str
    dtype: str
    config_sha256: str
    layout: str = LAYOUT
    quantize: str = "auto"  # the engine's quantize setting the image was prepared with

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)

    def mismatches(self, other: "Fingerprint") -> list[str]:
        return [f"{k}: image {getattr(other, k)!r}, wanted {getattr(self, k)!r}" for k in self.__dict__
                if getattr(self, k) != getattr(other, k)]


def config_hash(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fingerprint(model_dir: str, device_type: str, dtype: str, quantize: str = "auto") -> Fingerprint:
    # torch only when an image is made: the gateway imports this package's face
    import torch

    return Fingerprint(__version__, torch.__version__.split("+")[0], device_type, str(dtype).removeprefix("torch."),
                       config_hash(model_dir), quantize=quantize)


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
    verify_files(path, m)
    return m


def check_compatible(path: str, wanted: Fingerprint, source_identity: str | None = None) -> dict[str, Any]:
    """The manifest, if the image at ``path`` matches ``wanted`` (and, when given, was built from
    the bytes ``source_identity`` names: :func:`zerostart.weights.identity` of its source);
    else ImageIncompatible."""
    m = read_manifest(path)
    if source_identity is not None and m.get("source_identity") != source_identity:
        raise ImageIncompatible(f"{path}: the image was built from other bytes of {m.get('source') or 'its source'} "
                                f"(source identity {m.get('source_identity')} then, {source_identity} now): the "
                                "source changed since")
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
                extra: dict[str, Any] | None = None, compile_cache: bytes | None = None,
                source_identity: str | None = None) -> str:
    """Write ``tensors`` (views into one arena, as the engine holds them) as a ready image.
    ``source_identity``: ``zerostart.weights.identity`` of the source they were loaded from.

    Returns ``out``. If ``out`` appears meanwhile (another writer won), this copy is discarded.
    """
    entries, spans = _layout(tensors)
    raw, data_start = _header(entries)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        wpath = os.path.join(tmp, "model.safetensors")
        nbytes = _write_weights(wpath, raw, entries)
        assert os.path.getsize(wpath) == data_start + nbytes
        _checksums.write(tmp, [_checksums.compute(wpath, data_start)])
        for name in _COPY:
            src = os.path.join(model_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        for sub in _COPY_DIRS:
            src = os.path.join(model_dir, sub)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(tmp, sub), ignore=lambda d, names: [
                    n for n in names if not os.path.isfile(os.path.join(d, n))])
        if compile_cache:
            with open(os.path.join(tmp, "compile_cache.bin"), "wb") as f:
                f.write(compile_cache)
        manifest = {
            "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": source, "source_identity": source_identity, "fingerprint": fp.to_dict(),
            "weights": {"file": "model.safetensors", "bytes": nbytes, "data_start": data_start,
                        "tensors": sum(1 for e in entries if e[1] is not None), "pad_tensors": sum(1 for e in entries if e[1] is None),
                        "spans": spans, "quantized": _quantized(tensors)},
            "compile_cache": "compile_cache.bin" if compile_cache else None,
        }
        if extra:
            manifest["engine"] = extra
        seal(manifest, tmp, "model.safetensors", data_start)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _fsync_dir(tmp)
        return _publish(tmp, out, parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _quantized(tensors: dict[str, Any]) -> dict[str, int]:
    """What the image holds quantized: format ("int4 g32 +min") -> matrices (empty: all floats)."""
    from zerostart.weights._quant import qformat  # torch: only when an image is written (the gateway reads manifests)

    out: dict[str, int] = {}
    for name in tensors:
        if name.endswith((".qweight", ".qtiles")):
            fmt = qformat(tensors, name.rpartition(".")[0])
            if fmt is not None:
                out[fmt.describe()] = out.get(fmt.describe(), 0) + 1
    return out


Entry = tuple[str, Any, int, int]  # (name, tensor or None for a pad, start, nbytes)


# the groups the engine fuses into one matmul (q/k/v, gate/up; their weights, biases, or a
# quantized matrix's parts: each kind back to back): rank, place in the group
_KINDS = ("weight", "bias", "qweight", "scales", "mins", "qtiles", "stiles", "mtiles")
_FUSED = {f"{part}.{kind}": (rank * 10 + k, i)
          for rank, parts in ((1, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              (2, ("mlp.gate_proj", "mlp.up_proj")))
          for i, part in enumerate(parts) for k, kind in enumerate(_KINDS)}


def _layout(tensors: dict[str, Any]) -> tuple[list[Entry], dict[str, list[int]]]:
    """Layer groups in layer order, each on a 4096-byte boundary; within one, the other tensors
    in arena order and then each fused group's members back to back, in order (whether or not
    they were so in the arena: an image is always fusable for free). Tensors start 256-aligned,
    a group's later members right after the one before. Gaps are pad entries. Also each layer
    group's [start, end)."""
    groups: dict[tuple[int, int], list[tuple[str, Any]]] = {}
    for name, t in tensors.items():
        groups.setdefault(_layer_key(name), []).append((name, t))
    entries: list[Entry] = []
    offset = 0
    spans: dict[str, list[int]] = {}
    for key in sorted(groups):
        offset = _pad_to(entries, offset, (offset + _ALIGN - 1) // _ALIGN * _ALIGN)
        group_start = offset
        previous: tuple[int, int] | None = None
        for name, t in sorted(groups[key], key=lambda nt: (*_fused_key(nt[0]), nt[1].data_ptr())):
            rank, index = _fused_key(name)
            follows = rank and previous == (rank, index - 1) and offset % t.element_size() == 0
            offset = _pad_to(entries, offset, offset if follows else (offset + 255) // 256 * 256)
            n = t.numel() * t.element_size()
            entries.append((name, t if t.is_contiguous() else t.contiguous(), offset, n))
            offset += n
            previous = (rank, index)
        label = f"layer.{key[1]}" if key[0] == 1 else {0: "embed", 2: "final", 3: "head"}[key[0]]
        spans[label] = [group_start, offset]
    return entries, spans


def _fused_key(name: str) -> tuple[int, int]:
    """(rank of its fused group, place in it); (0, 0) for a tensor of no group."""
    m = re.search(r"(?:^|\.)layers\.\d+\.(.+)$", name)
    return _FUSED.get(m.group(1), (0, 0)) if m else (0, 0)


def _header(entries: list[Entry]) -> tuple[bytes, int]:
    """The safetensors header (padded so the data section starts 4096-aligned) and that start."""
    # torch only when an image is made: the gateway imports this package's face
    from zerostart.weights._dtypes import SAFETENSORS_NAMES

    header: dict[str, Any] = {"__metadata__": {"format": "pt", "zerostart": "ready-image"}}
    for name, t, start, n in entries:
        dtype, shape = ("U8", [n]) if t is None else (SAFETENSORS_NAMES[t.dtype], list(t.shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + n]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    data_start = (8 + len(raw) + _ALIGN - 1) // _ALIGN * _ALIGN
    return raw + b" " * (data_start - 8 - len(raw)), data_start


def _write_weights(path: str, raw: bytes, entries: list[Entry]) -> int:
    """Write the file (fsynced); returns the bytes of its data section."""
    # torch only when an image is made: the gateway imports this package's face
    import torch

    pos = 0
    zeros = bytes(_ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t, start, n in entries:
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
    return pos


def _publish(tmp: str, out: str, parent: str) -> str:
    """Rename the finished image into place (atomic); another writer's image there wins."""
    try:
        os.rename(tmp, out)  # fails if another writer already put an image there
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
    key = hashlib.sha256(json.dumps([os.path.abspath(source) if is_local(source) else source, fp.to_dict()],
                                    sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(root or os.path.join(cache_dir(), "images"), key)
