"""Bytes -> tensors: safetensors checkpoints into one arena per load, at the storage limit.

    from zerostart import weights
    tensors = weights.load("path/to/model", device="cuda")

``load`` returns a ``dict[str, torch.Tensor]`` whose tensors are views into one allocation on
the target device (:func:`load_arena` returns the :class:`Arena` itself, with the load's
statistics). The header parser and checkpoint resolution need no torch; the names that do are
imported on first use, so ``from zerostart.weights import read_header`` stays light.
"""

from typing import Any

from zerostart.weights._checkpoint import Checkpoint, resolve
from zerostart.weights._format import Header, TensorInfo, WeightsError, parse_header, read_header
from zerostart.weights._paths import cache_dir
from zerostart.weights._remote import ObjectChanged, SourceError, is_remote
from zerostart.weights._reserve import release_host, reserve_host, reserved_host

_TORCH_NAMES = {"Arena", "LoadConfig", "LoadStats", "load", "load_arena", "save_file"}
_SOURCE_NAMES = {"localize", "pull", "open_source"}

__all__ = [
    "Arena",
    "Checkpoint",
    "Header",
    "LoadConfig",
    "LoadStats",
    "TensorInfo",
    "ObjectChanged",
    "SourceError",
    "WeightsError",
    "cache_dir",
    "is_remote",
    "localize",
    "pull",
    "load",
    "load_arena",
    "parse_header",
    "read_header",
    "release_host",
    "reserve_host",
    "reserved_host",
    "resolve",
    "save_file",
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
