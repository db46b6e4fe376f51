"""Ready images as a worker uses them (DESIGN.md §2): find the image of a source in the image
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
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("zerostart.serve.worker")

MODES = ("off", "use", "write")
_STALE_TEMP_S = 3600.0  # a writer's temporary directory untouched this long was abandoned (its process died)


@dataclass
class ImageReport:
    """What a worker did with ready images, for ``/zerostart/ready`` and ``/zerostart/phases``.

    ``status``: ``off``, ``is_source`` (the model path is an image), ``missing``, ``used``,
    ``rejected`` (corrupt or incompatible: the source was loaded), ``unavailable`` (the store
    could not be consulted; ``error`` says why), ``queued``, ``writing``, ``written``,
    ``write_failed`` (``error``). ``rejected`` keeps why an image found at load time was not
    used, also once a new one was written in its place.
    """

    mode: str = "off"
    path: str | None = None
    status: str = "off"
    error: str | None = None
    rejected: str | None = None
    write_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode, "path": self.path, "status": self.status}
        if self.error is not None:
            d["error"] = self.error
        if self.rejected is not None:
            d["rejected"] = self.rejected
        if self.write_s is not None:
            d["write_s"] = round(self.write_s, 4)
        return d


def is_image(source: str) -> bool:
    from zerostart.weights import _image

    return "://" not in source and os.path.isdir(source) and _image.is_image(source)


def locate(source: str, device: str, dtype: str | None) -> tuple[str, Any]:
    """The image-store directory for ``source`` loaded on ``device`` with ``dtype`` (None: the
    engine's default), and the fingerprint an image there must carry. Imports torch. Raises
    the engine's or the weights package's errors when the source's config cannot be read."""
    import torch

    from zerostart import weights
    from zerostart.engine._config import ModelConfig
    from zerostart.engine._load import resolve_dtype
    from zerostart.weights import _image

    model_dir = weights.localize(source)
    cfg = ModelConfig.from_file(os.path.join(model_dir, "config.json"))
    dev = torch.device(device)
    fp = _image.fingerprint(model_dir, dev.type, str(resolve_dtype(dtype, dev, cfg)))
    return _image.image_store(source, fp), fp


def check(path: str, fp: Any) -> str | None:
    """None if the image at ``path`` may be restored for ``fp``; else why not. (Checksums are
    verified while it loads: a corrupt file surfaces as a load error.)"""
    from zerostart.weights import _image

    if not os.path.exists(path):
        return "missing"
    try:
        _image.check_compatible(path, fp)
    except _image.ImageError as e:
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


def write(engine: Any, path: str | None, fp: Any, host_tensors: dict[str, Any] | None = None) -> str:
    """Write ``engine``'s prepared weights as the ready image of its source (atomically; a
    concurrent writer of the same image wins or loses as a whole). ``host_tensors``: the same
    weights already copied to host memory (same names, same relative offsets), written instead
    of the engine's own. Returns the directory."""
    from types import SimpleNamespace

    from zerostart.snapshot._cli import write_engine_image
    from zerostart.weights import _image

    if fp is None:
        fp = _image.fingerprint(engine.model_dir, engine.device.type, str(engine.dtype))
    if path is None:
        path = _image.image_store(engine.source, fp)
    sweep_abandoned(path)
    held = engine if host_tensors is None else SimpleNamespace(
        arena=SimpleNamespace(tensors=host_tensors), fusion=getattr(engine, "fusion", None),
        engine_config=getattr(engine, "config", None))
    return write_engine_image(held, engine.model_dir, path, fp, source=engine.source)
