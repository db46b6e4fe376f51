"""Ready images as a worker uses them (docs/design.md §2): find the image of a source in the image
store, say whether it may be restored, and replace a bad one.

``images`` is a model's setting: ``off`` (never look), ``use`` (restore a matching image when
there is one) or ``write`` (``use``, and after a load from the source write the image in the
background so the next cold start restores it). A corrupt or incompatible image is reported
and never served from: the worker loads the source instead (and in ``write`` mode replaces
the image).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from zerostart.names import device_type, is_local

if TYPE_CHECKING:
    from zerostart.engine import Engine
    from zerostart.weights import Fingerprint

log = logging.getLogger("zerostart.serve.worker")

_STALE_TEMP_S = 3600.0  # a writer's temporary directory untouched this long was abandoned (its process died)


def is_image(source: str) -> bool:
    from zerostart import snapshot  # (here: the worker imports it in its timed import phase)

    return is_local(source) and os.path.isdir(source) and snapshot.is_image(source)


def locate(source: str, device: str, dtype: str | None, quantize: str = "auto") -> tuple[str, Fingerprint, str]:
    """The image-store directory for ``source`` loaded on ``device`` with ``dtype`` (None: the
    engine's default) and ``quantize`` (the engine's setting), the fingerprint an image there
    must carry, and the identity of the source's bytes now (an image built from other bytes is stale). Imports torch. Raises the
    engine's or the weights package's errors when the source's config cannot be read."""
    # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
    from zerostart import engine, snapshot, weights

    identity = weights.identity(source)
    model_dir = weights.localize(source)
    held = engine.weights_dtype(model_dir, device, dtype, quantize, source)
    fp = snapshot.fingerprint(model_dir, device_type(device), str(held), quantize)
    return snapshot.image_store(source, fp), fp, identity


def check(path: str, fp: Fingerprint, identity: str | None = None) -> str | None:
    """None if the image at ``path`` may be restored for ``fp`` and was built from the source's
    bytes as ``identity`` names them now; else why not. (Checksums are verified while it loads:
    a corrupt file surfaces as a load error.)"""
    # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
    from zerostart import snapshot

    if not os.path.exists(path):
        return "missing"
    try:
        snapshot.check_compatible(path, fp, identity)
    except snapshot.ImageError as e:
        return str(e)
    return None


def discard(path: str) -> None:
    """Remove a rejected image so that a new one can be written in its place. It is renamed
    aside first (one atomic step), so a reader never sees half of it."""
    aside = f"{path}.rejected-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
    log.warning("removed the rejected image %s", path)


def sweep_abandoned(path: str) -> None:
    """Delete temporary directories that writers of this image left when their process died."""
    parent, base = os.path.split(path)
    prefix = f".{base}.tmp-"
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    now = time.time()
    for name in names:
        if not name.startswith(prefix):
            continue
        d = os.path.join(parent, name)
        try:
            newest = max([os.path.getmtime(d)] + [os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)])
        except OSError:
            continue
        if now - newest > _STALE_TEMP_S:
            shutil.rmtree(d, ignore_errors=True)


def write(engine: Engine, path: str | None, fp: Fingerprint | None, host_tensors: dict[str, Any] | None = None,
          identity: str | None = None) -> str:
    """Write ``engine``'s prepared weights as the ready image of its source (atomically; a
    concurrent writer of the same image wins or loses as a whole), with its compile caches.
    ``host_tensors``: the same weights already copied to host memory (same names, same relative
    offsets), written instead of the engine's own. Returns the directory."""
    # imported in the worker's timed import phase (torch, the engine, snapshot), not at its start
    from zerostart import snapshot

    if fp is None:
        fp = snapshot.fingerprint(engine.model_dir, engine.device.type, str(engine.dtype), engine.config.quantize)
    if path is None:
        path = snapshot.image_store(engine.source, fp)
    sweep_abandoned(path)
    return snapshot.write_engine_image(engine, engine.model_dir, path, fp, source=engine.source, tensors=host_tensors,
                                       source_identity=identity)
