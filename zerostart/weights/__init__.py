"""Bytes -> tensors: safetensors checkpoints into one arena per load, at the storage limit.

    from zerostart import weights
    tensors = weights.load("path/to/model", device="cuda")

``load`` returns a ``dict[str, torch.Tensor]`` whose tensors are views into one allocation on
the target device (:func:`load_arena` returns the :class:`Arena` itself, with the load's
statistics). The header parser and checkpoint resolution need no torch; the names that do are
imported on first use, so ``from zerostart.weights import read_header`` stays light.
"""

from typing import Any

from zerostart.weights._cache import Cache
from zerostart.weights._checkpoint import Checkpoint, resolve
from zerostart.weights._format import Header, TensorInfo, WeightsError, parse_header, read_header
from zerostart.weights._image import (MANIFEST, Fingerprint, ImageError, ImageIncompatible, check_compatible, fingerprint,
                                      image_store, is_image, read_manifest, write_image)
from zerostart.weights._io import (Region, align_up, drop_page_cache, map_anonymous_at, map_shared_at, open_direct,
                                   pread_into, release_pages, touch_pages)
from zerostart.weights._paths import cache_dir
from zerostart.names import is_remote
from zerostart.weights._remote import ObjectChanged, SourceError, Transport, list_objects, reset_credentials
from zerostart.weights._reserve import arena_bytes, release_host, reserve_host, reserved_host

_TORCH_NAMES = {"Arena", "LoadConfig", "LoadStats", "load", "load_arena", "save_file"}
_SOURCE_NAMES = {"hf_snapshot", "localize", "pull", "open_source"}

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
    # sources and the local cache
    "Cache",
    "ObjectChanged",
    "SourceError",
    "Transport",
    "cache_dir",
    "hf_snapshot",
    "is_remote",
    "list_objects",
    "localize",
    "open_source",
    "pull",
    "reset_credentials",
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
    # host memory and file I/O (parking, benchmarks' ceilings)
    "Region",
    "align_up",
    "arena_bytes",
    "drop_page_cache",
    "map_anonymous_at",
    "map_shared_at",
    "open_direct",
    "pread_into",
    "release_host",
    "release_pages",
    "reserve_host",
    "reserved_host",
    "touch_pages",
]


def __getattr__(name: str) -> Any:
    if name in _SOURCE_NAMES:
        from zerostart.weights import _sources

        return getattr(_sources, name)
    if name in _TORCH_NAMES:
        if name == "save_file":
            from zerostart.weights._save import save_file

            return save_file
        from zerostart.weights import _load

        return getattr(_load, name)
    raise AttributeError(f"module 'zerostart.weights' has no attribute {name!r}")
