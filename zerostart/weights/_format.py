"""The safetensors file format: header parsing and strict validation, without torch.

A safetensors file is ``u64 little-endian N`` + ``N bytes of JSON`` + a data section. The JSON
maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the data section) plus an optional ``"__metadata__"`` object of strings. Valid files cover the
data section exactly: tensors sorted by offset are contiguous, start at 0, end at its end.

Everything malformed raises :class:`WeightsError` naming the file and, where one is involved,
the tensor. Nothing else may escape :func:`parse_header` (the fuzz tests hold it to that).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from zerostart.weights._errors import WeightsError

MAX_HEADER_BYTES = 100_000_000  # as the reference implementation: larger headers are refused

# dtype name -> size in bits. Sub-byte types (F4, F6_*) are packed; a tensor's bit count must
# then be a whole number of bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: str
    file_size: int
    data_start: int  # absolute file offset of the data section (8 + header length)
    tensors: dict[str, TensorInfo]  # in data-offset order
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of one ``.safetensors`` file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsError(f"{path}: truncated file ({size} bytes; a safetensors file starts with an 8-byte header length)")
            (n,) = struct.unpack("<Q", prefix)
            _check_header_length(path, n, size)
            raw = f.read(n)
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a directory, not a .safetensors file") from None
    return parse_header(prefix + raw, file_size=size, path=path)


def parse_header(buf: bytes, file_size: int | None = None, path: str = "<bytes>") -> Header:
    """Parse a header from ``buf`` (which holds at least the first ``8 + N`` bytes of a file).

    ``file_size`` is the whole file's size; it defaults to ``len(buf)`` (a whole file in memory).
    """
    size = len(buf) if file_size is None else file_size
    if len(buf) < 8:
        raise WeightsError(f"{path}: truncated file ({size} bytes; a safetensors file starts with an 8-byte header length)")
    (n,) = struct.unpack("<Q", buf[:8])
    _check_header_length(path, n, size)
    if len(buf) < 8 + n:
        raise WeightsError(f"{path}: truncated header (expected {n} bytes, have {len(buf) - 8})")
    raw = bytes(buf[8 : 8 + n])
    if not raw.startswith(b"{"):
        raise WeightsError(f"{path}: header is not a JSON object (it must start with '{{')")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise WeightsError(f"{path}: header has key {e.args[0]!r} twice") from None
    except UnicodeDecodeError as e:
        raise WeightsError(f"{path}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: header is not valid JSON ({e.msg} at byte {e.pos})") from None
    except RecursionError:
        raise WeightsError(f"{path}: header JSON is nested too deeply") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: header is not a JSON object")

    metadata: dict[str, str] = {}
    if "__metadata__" in obj:
        meta = obj.pop("__metadata__")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise WeightsError(f"{path}: __metadata__ must be an object of strings")
        metadata = meta

    data_start = 8 + n
    data_size = size - data_start
    infos = [_tensor_info(path, name, entry) for name, entry in obj.items()]
    infos.sort(key=lambda t: (t.start, t.end))
    cursor = 0
    for t in infos:
        if t.end > data_size:
            raise WeightsError(
                f"{path}: tensor {t.name!r} ends at byte {t.end} of the data section, beyond its "
                f"{data_size} bytes (the file is truncated or the offsets are wrong)")
        if t.start < cursor:
            raise WeightsError(f"{path}: tensor {t.name!r} overlaps the tensor before it (starts at {t.start}, previous ends at {cursor})")
        if t.start > cursor:
            raise WeightsError(f"{path}: hole of {t.start - cursor} bytes before tensor {t.name!r} (data section bytes {cursor}..{t.start} belong to no tensor)")
        cursor = t.end
    if cursor != data_size:
        raise WeightsError(f"{path}: {data_size - cursor} trailing bytes after the last tensor (data section is {data_size} bytes, tensors cover {cursor})")
    return Header(path, size, data_start, {t.name: t for t in infos}, metadata)


def _check_header_length(path: str, n: int, size: int) -> None:
    if n > MAX_HEADER_BYTES:
        raise WeightsError(f"{path}: header length {n} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > size:
        raise WeightsError(f"{path}: header length {n} reaches beyond the end of the file ({size} bytes; truncated?)")


def _tensor_info(path: str, name: str, entry: Any) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise WeightsError(f"{where}: entry is not an object")
    extra = set(entry) - {"dtype", "shape", "data_offsets"}
    if extra:
        raise WeightsError(f"{where}: unexpected keys {sorted(extra)}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise WeightsError(f"{where}: missing or non-string dtype")
    if dtype not in DTYPE_BITS:
        raise WeightsError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise WeightsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise WeightsError(f"{where}: data_offsets must be [begin, end] non-negative integers, got {offsets!r}")
    start, end = offsets
    if start > end:
        raise WeightsError(f"{where}: data_offsets begin {start} is after end {end}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise WeightsError(f"{where}: {dtype} tensor of shape {shape} is not a whole number of bytes")
    if bits // 8 != end - start:
        raise WeightsError(
            f"{where}: shape {shape} x {dtype} is {bits // 8} bytes but its byte range [{start}, {end}) holds {end - start}")
    return TensorInfo(name, dtype, tuple(shape), start, end)


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d
