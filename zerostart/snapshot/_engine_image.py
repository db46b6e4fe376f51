"""A loaded engine written as a ready image: its prepared weights, the notes of how they were
fused, and its torch.compile artifacts when it compiled (docs/design.md §2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from zerostart.weights import Fingerprint, write_image

if TYPE_CHECKING:
    from zerostart.engine import Engine


def write_engine_image(engine: Engine, model_dir: str, out: str, fp: Fingerprint, *, source: str = "",
                       tensors: Mapping[str, Any] | None = None, source_identity: str | None = None) -> str:
    """Write ``engine``'s prepared weights (its arena, as held) as a ready image in ``out``;
    returns the directory. ``tensors``: the same weights already copied elsewhere (host memory,
    same names, same relative offsets), written instead of the arena's. The fusion notes and the
    compile caches always come from ``engine`` itself. ``source_identity``: what the source's
    bytes were when they were loaded (``zerostart.weights.identity``), so that a changed source
    invalidates the image."""
    extra = {"fusion": list(getattr(engine.fusion, "notes", None) or [])}
    cache = _compile_cache() if engine.config.compile else None
    held = dict(engine.arena.tensors if tensors is None else tensors)
    return write_image(held, model_dir, out, fp, source=source, extra=extra, compile_cache=cache,
                       source_identity=source_identity)


def _compile_cache() -> bytes | None:
    """This process's torch.compile artifacts (None where torch cannot save them)."""
    # torch only when parking runs: the gateway imports this package's face
    import torch

    try:
        artifacts = torch.compiler.save_cache_artifacts()
    except (AttributeError, RuntimeError):
        return None
    return artifacts[0] if artifacts else None
