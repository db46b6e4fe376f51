"""Sources behind one interface: every scheme has its store, and a store's identity changes
whenever the bytes of the model's files may have (and only then)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from zerostart import weights
from zerostart.names import Scheme
from zerostart.weights import Store
from zerostart.weights._sources import store_module


@pytest.mark.parametrize("scheme", list(Scheme))
def test_every_scheme_has_a_store(scheme):
    module = store_module(scheme)
    assert callable(module.open_store)
    spec = {"local": "/tmp", "hf": "hf://org/name", "s3": "s3://bucket/prefix", "http": "https://host/m"}[scheme.value]
    store = module.open_store(spec)
    assert isinstance(store, Store), f"{module.__name__}: its store does not have the Store interface"
    store.close()


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    weights.save_file({"w": torch.arange(1024, dtype=torch.float32)}, d / "model.safetensors")
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "README.md").write_text("not a model file")
    return d


def test_local_identity_follows_every_change_of_bytes(model):
    f = model / "model.safetensors"
    first = weights.identity(str(model))
    assert weights.identity(str(model)) == first  # nothing changed: the same

    (model / "README.md").write_text("edited")  # not one of the model's files
    assert weights.identity(str(model)) == first

    st = os.stat(f)
    with open(f, "r+b") as fh:  # the same size, written in place, the old mtime put back
        fh.seek(st.st_size - 4)
        fh.write(b"\x01\x02\x03\x04")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = weights.identity(str(model))
    assert second != first

    copy = model / "copy.tmp"
    shutil.copyfile(f, copy)
    os.replace(copy, f)  # replaced by a rename (a new inode)
    assert weights.identity(str(model)) != second

    third = weights.identity(str(model))
    (model / "config.json").write_text('{"hidden_size": 16}')
    assert weights.identity(str(model)) != third


def test_a_single_file_source_and_its_listing(model):
    store = weights.open_store(str(model / "model.safetensors"))
    names = {o.name for o in store.list()}
    assert names == {"model.safetensors", "config.json"}  # the file, and the model files beside it
    obj = store.stat("model.safetensors")
    buf = bytearray(8)
    store.read_range(obj, 0, memoryview(buf))
    with open(model / "model.safetensors", "rb") as fh:
        assert bytes(buf) == fh.read(8)
    assert store.local_dir() == str(model)


def test_unknown_scheme_is_refused():
    with pytest.raises(weights.WeightsError, match="unknown source scheme"):
        weights.open_store("gs://bucket/model")
