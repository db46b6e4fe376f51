"""Ready images as the worker handles them, in process: finding an image for a source and
runtime, deciding whether to use it, replacing a rejected one, cleaning up after dead writers,
and writing from a host copy of the weights (the CUDA path) byte for byte like from the engine."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import pytest

from zerostart import snapshot
from zerostart.serve.worker import _images
from zerostart.serve.worker._holder import Holder
from zerostart.serve.worker._image_writer import host_copy


@pytest.fixture(scope="module")
def engine(tiny_model: str):
    from zerostart.engine import Engine

    return Engine.from_pretrained(tiny_model, device="cpu")


def _blob(path: str) -> bytes:
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        return f.read()


def test_locate_check_discard(engine, tiny_model: str, tmp_path) -> None:
    source = str(tmp_path / "source")
    shutil.copytree(tiny_model, source)  # a source of its own: no image of it exists yet
    path, fp, identity = _images.locate(source, "cpu", None)
    assert fp == snapshot.fingerprint(engine.model_dir, "cpu", str(engine.dtype))  # the engine's default dtype
    assert path == snapshot.image_store(source, fp) != snapshot.image_store(tiny_model, fp)
    other = "float32" if fp.dtype == "bfloat16" else "bfloat16"
    assert _images.locate(source, "cpu", other)[0] != path  # another dtype, another image
    assert _images.check(path, fp, identity) == "missing"

    out = _images.write(engine, str(tmp_path / "images" / "img"), fp, identity=identity)
    assert _images.check(out, fp, identity) is None and _images.is_image(out) and not _images.is_image(source)
    why = _images.check(out, fp, "another identity")
    assert why is not None and "the source changed since" in why
    why = _images.check(out, dataclasses.replace(fp, dtype=other))
    assert why is not None and "does not match this runtime" in why and "dtype" in why

    _images.discard(out)
    assert not os.path.exists(out) and os.listdir(tmp_path / "images") == []
    _images.discard(out)  # already gone: nothing to do


def test_abandoned_temporary_directories_are_swept(tmp_path) -> None:
    image = tmp_path / "abc"
    old, fresh, other = tmp_path / ".abc.tmp-dead", tmp_path / ".abc.tmp-busy", tmp_path / ".xyz.tmp-dead"
    for d in (old, fresh, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    long_ago = time.time() - 2 * 3600
    for p in (old, old / "model.safetensors", other, other / "model.safetensors"):
        os.utime(p, (long_ago, long_ago))
    _images.sweep_abandoned(str(image))
    assert not old.exists()  # a writer that died long ago
    assert fresh.exists()  # a writer still at work
    assert other.exists()  # another image's


def test_writing_from_a_host_copy_gives_the_same_image(engine, tmp_path) -> None:
    fp = snapshot.fingerprint(engine.model_dir, "cpu", str(engine.dtype))
    direct = _images.write(engine, str(tmp_path / "direct"), fp)
    holder = Holder(time.perf_counter(), time.time())
    holder.engine = engine
    host = host_copy(holder)
    assert not holder.paused  # requests were held only during the copy
    lo = min(t.data_ptr() for t in engine.arena.tensors.values())
    host_lo = min(h.data_ptr() for h in host.values())
    for name, t in engine.arena.tensors.items():
        h = host[name]
        assert h.equal(t) and h.data_ptr() != t.data_ptr(), name  # a copy, with the same values ...
        assert h.data_ptr() - host_lo == t.data_ptr() - lo, name  # ... at the same relative offset
    copied = _images.write(engine, str(tmp_path / "copied"), fp, host_tensors=host)
    assert _blob(copied) == _blob(direct)


def test_an_image_written_from_a_host_copy_carries_the_compile_caches(engine, tmp_path, monkeypatch) -> None:
    """On CUDA the image is written from a host copy of the weights; an engine that compiled must
    still have its torch.compile artifacts written into the image. (They were not: the host copy
    went to the writer as a stand-in object whose compile setting the writer never read.)"""
    import torch

    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, compile=True))
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled kernels", None))
    fp = snapshot.fingerprint(engine.model_dir, "cpu", str(engine.dtype))
    holder = Holder(time.perf_counter(), time.time())
    holder.engine = engine
    for name, host in (("copied", host_copy(holder)), ("direct", None)):
        out = _images.write(engine, str(tmp_path / name), fp, host_tensors=host)
        assert snapshot.read_manifest(out)["compile_cache"] == "compile_cache.bin", name
        with open(os.path.join(out, "compile_cache.bin"), "rb") as f:
            assert f.read() == b"compiled kernels", name


def test_an_image_whose_manifest_predates_the_file_list_is_stale_and_replaced(engine, tiny_model: str, tmp_path) -> None:
    """An image written before manifests listed every file: nothing vouches for its tokenizer,
    configs or templates, so it is not restored (the worker loads the source and writes it again)."""
    import json

    source = str(tmp_path / "source")
    shutil.copytree(tiny_model, source)
    path, fp, identity = _images.locate(source, "cpu", None)
    out = _images.write(engine, path, fp, identity=identity)
    manifest = os.path.join(out, snapshot.MANIFEST)
    with open(manifest) as f:
        m = json.load(f)
    del m["files"], m["manifest_xxh3_64"]  # as an older zerostart wrote it
    with open(manifest, "w") as f:
        json.dump(m, f)
    why = _images.check(out, fp, identity)
    assert why is not None and "older zerostart" in why and "write it again" in why, why
    _images.discard(out)  # what the writer does with a rejected image before writing its own
    assert _images.check(_images.write(engine, path, fp, identity=identity), fp, identity) is None
