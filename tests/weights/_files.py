"""Build safetensors files byte by byte, valid or deliberately broken."""

from __future__ import annotations

import json
import struct


def raw_file(header: dict, data: bytes, pad_to: int = 8, header_bytes: bytes | None = None) -> bytes:
    """A safetensors file from a header dict (or raw header bytes) and a data section."""
    h = header_bytes if header_bytes is not None else json.dumps(header, separators=(",", ":")).encode()
    if pad_to:
        h += b" " * ((-len(h) - 8) % pad_to)
    return struct.pack("<Q", len(h)) + h + data


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
