"""Bytes -> tensors: safetensors and GGUF checkpoints into one arena per load, at the storage limit.

    from zerostart import weights
    tensors = weights.load("path/to/model", device="cuda")

``load`` returns a ``dict[str, torch.Tensor]`` whose tensors are views into one allocation on
the target device (:func:`load_arena` returns the :class:`Arena` itself, with the load's
statistics). Sources (local paths, ``hf://``, ``s3://``, ``https://``) are read through one
:class:`Store` interface per scheme (``open_store``); ``identity(source)`` names the bytes a
model is made of. The header parsers, stores and checkpoint resolution need no torch; the
names that do are imported on first use, so ``from zerostart.weights import read_header``
stays light.
"""

import importlib
from typing import Any

from zerostart.names import is_remote
from zerostart.weights._cache import Cache
from zerostart.weights._checkpoint import Checkpoint, resolve
from zerostart.weights._errors import ImageError, ImageIncompatible, ObjectChanged, SourceError, WeightsError
from zerostart.weights._format import Header, TensorInfo, parse_header, read_header
from zerostart.weights._gguf import GgufModel, GgufTensor, is_gguf, open_gguf
from zerostart.weights._image import (Fingerprint, check_compatible, fingerprint, image_store, is_image, read_manifest,
                                      write_image)
from zerostart.weights._image_files import MANIFEST
from zerostart.weights._io import (Eviction, Region, align_up, cached_fraction, drop_all_page_caches, evict_page_cache,
                                   map_anonymous_at, map_shared_at, open_direct, own_pages, pread_into, release_pages,
                                   touch_pages)
from zerostart.weights._paths import cache_dir
from zerostart.weights._qformats import GGUF_QUANTIZED, gguf_held_nbytes, quantized_bits, quantized_nbytes
from zerostart.weights._remote import Transport
from zerostart.weights._reserve import arena_bytes, release_host, reserve_host, reserved_host
from zerostart.weights._store import ObjectInfo, Store
from zerostart.weights._store_hf import hf_gguf
from zerostart.weights._store_s3 import reset_credentials

# names imported on first use: module -> names
_LAZY = {
    "_load": ("Arena", "LoadConfig", "LoadStats", "load", "load_arena"),  # torch
    "_save": ("save_file",),  # torch
    "_gguf_load": ("convert_gguf",),  # torch
    "_quant": ("QFormat", "QUANT_SUFFIXES", "dequantize", "qformat", "quantize"),  # torch
    "_quantize": ("quantize_arena",),  # torch
    "_sources": ("gguf_file", "identity", "local_copy", "localize", "open_source", "open_store", "unreachable"),
    "_pull": ("pull",),
}
_MODULE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    # loading
    "Arena",
    "Checkpoint",
    "Header",
    "LoadConfig",
    "LoadStats",
    "TensorInfo",
    "WeightsError",
    "load",
    "load_arena",
    "parse_header",
    "read_header",
    "resolve",
    "save_file",
    # GGUF files
    "GgufModel",
    "GgufTensor",
    "convert_gguf",
    "gguf_file",
    "is_gguf",
    "open_gguf",
    # quantized weights: int4/int8 with group scales (GGUF quants kept, or quantized at load)
    "GGUF_QUANTIZED",
    "QFormat",
    "QUANT_SUFFIXES",
    "dequantize",
    "gguf_held_nbytes",
    "qformat",
    "quantize",
    "quantized_bits",
    "quantized_nbytes",
    "quantize_arena",
    # sources, their stores and the local cache
    "Cache",
    "ObjectChanged",
    "ObjectInfo",
    "SourceError",
    "Store",
    "Transport",
    "cache_dir",
    "hf_gguf",
    "identity",
    "is_remote",
    "local_copy",
    "localize",
    "open_source",
    "open_store",
    "pull",
    "reset_credentials",
    "unreachable",
    # ready images: the format (written by zerostart.snapshot, read by load_arena)
    "MANIFEST",
    "Fingerprint",
    "ImageError",
    "ImageIncompatible",
    "check_compatible",
    "fingerprint",
    "image_store",
    "is_image",
    "read_manifest",
    "write_image",
    # host memory and file I/O (parking, benchmarks' ceilings, cold starts)
    "Eviction",
    "Region",
    "align_up",
    "arena_bytes",
    "cached_fraction",
    "drop_all_page_caches",
    "evict_page_cache",
    "map_anonymous_at",
    "map_shared_at",
    "open_direct",
    "own_pages",
    "pread_into",
    "release_host",
    "release_pages",
    "reserve_host",
    "reserved_host",
    "touch_pages",
]


def __getattr__(name: str) -> Any:
    module = _MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'zerostart.weights' has no attribute {name!r}")

    return getattr(importlib.import_module(f"zerostart.weights.{module}"), name)
