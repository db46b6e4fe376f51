"""The cold ladder with the real engine: images, execute-while-load, parking, remote sources."""

import os
import subprocess
import sys

import pytest
import torch

from zerostart import snapshot
from zerostart.engine import Engine, EngineConfig, EngineError, SamplingParams
from zerostart.engine.demo import write_demo_model

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo") / "tiny"
    write_demo_model(str(d), size="tiny")
    return str(d)


@pytest.fixture(scope="module")
def env():
    import zerostart

    root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
    return dict(os.environ, PYTHONPATH=root)


def tokens(engine, prompt="hello world"):
    return [ev.token_id for ev in engine.generate(prompt, GREEDY) if ev.token_id is not None]


@pytest.fixture(scope="module")
def image(tiny, tmp_path_factory, env):
    out = str(tmp_path_factory.mktemp("images") / "tiny-image")
    r = subprocess.run([sys.executable, "-m", "zerostart", "snapshot", "--model", tiny, "--out", out, "--dtype", "float32"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == out
    return out


def test_image_generates_what_the_source_does(tiny, image):
    src = Engine.from_pretrained(tiny)
    img = Engine.from_pretrained(image)
    assert tokens(img) == tokens(src)
    assert img.fusion.regrouped_bytes == 0 and all(img.fusion.qkv), "fusion is free from an image"
    read = img.timeline.get("read")
    assert read is not None and read.detail["verified_bytes"] > 0, "the image's checksums were verified"
    assert img.model_name == "tiny"


def test_generate_cli_accepts_an_image(tiny, image, env):
    a = subprocess.run([sys.executable, "-m", "zerostart", "generate", "--model", tiny, "--prompt", "hi", "--max-tokens", "8",
                        "--temperature", "0"], capture_output=True, text=True, env=env, timeout=300)
    b = subprocess.run([sys.executable, "-m", "zerostart", "generate", "--model", image, "--prompt", "hi", "--max-tokens", "8",
                        "--temperature", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout


@pytest.fixture(scope="module")
def small_image(tmp_path_factory, env):
    d = tmp_path_factory.mktemp("demo") / "small"
    write_demo_model(str(d), size="small")
    out = str(tmp_path_factory.mktemp("images") / "small-image")
    r = subprocess.run([sys.executable, "-m", "zerostart", "snapshot", "--model", str(d), "--out", out],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def test_execute_while_load_overlaps_warmup_with_the_read(small_image, monkeypatch):
    import threading
    import time

    from zerostart.weights import _io, _pipeline

    real_read, real_populate = _pipeline.FileHandle.read_into, _io.Region.populate
    half = os.path.getsize(os.path.join(small_image, "model.safetensors")) // 2
    warming = threading.Event()  # set when the warm-up gives a core to the readers

    def slow_read(self, buf, offset):  # a slow disk: 30 ms per read
        time.sleep(0.03)
        if offset >= half:  # and the second half arrives only once the warm-up runs (however
            warming.wait(20)  # loaded the machine): the overlap this test is about, made certain
        return real_read(self, buf, offset)

    def slow_populate(self, offset, length):  # the same disk under a mapped file
        time.sleep(0.03 * max(1, length >> 23))
        if offset >= half:
            warming.wait(20)
        return real_populate(self, offset, length)

    monkeypatch.setattr(_pipeline.FileHandle, "read_into", slow_read)
    monkeypatch.setattr(_io.Region, "populate", slow_populate)
    import torch

    threads, real_set = torch.get_num_threads(), torch.set_num_threads
    real_set(2)
    calls: list[int] = []

    def set_num_threads(n: int) -> None:
        calls.append(n)
        real_set(n)
        if n == 1:
            warming.set()

    monkeypatch.setattr(torch, "set_num_threads", set_num_threads)
    try:
        _io.evict_page_cache([os.path.join(small_image, "model.safetensors")])
        e = Engine.from_pretrained(small_image, config=EngineConfig(overlap_load=True))
        # the warm-up computed on one thread fewer while bytes arrived, then got both back
        assert calls == [1, 2] and torch.get_num_threads() == 2
    finally:
        real_set(threads)
    prepare, read, warm = e.timeline.get("prepare"), e.timeline.get("read"), e.timeline.get("warmup")
    assert prepare.detail["overlap_load"] is True
    assert warm.start < read.end, "warm-up began before the last byte arrived"
    assert warm.detail["threads_while_loading"] == 1
    _io.evict_page_cache([os.path.join(small_image, "model.safetensors")])
    off = Engine.from_pretrained(small_image, config=EngineConfig(overlap_load=False))
    assert off.timeline.get("prepare").detail["overlap_load"] is False
    assert off.timeline.get("warmup").start >= off.timeline.get("read").end
    assert "threads_while_loading" not in off.timeline.get("warmup").detail
    assert tokens(e) == tokens(off)


def test_incompatible_image_is_refused(image):
    with pytest.raises(EngineError, match="does not match this runtime.*dtype"):
        Engine.from_pretrained(image, dtype="bfloat16")


def test_corrupt_image_is_refused(image, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(image, bad)
    p = bad / "model.safetensors"
    blob = bytearray(p.read_bytes())
    blob[-100] ^= 0xFF
    p.write_bytes(bytes(blob))
    with pytest.raises(EngineError, match="fails its checksum"):
        Engine.from_pretrained(str(bad))


def test_park_and_wake_on_cpu(tiny):
    e = Engine.from_pretrained(tiny)
    before = tokens(e)
    ptr = e.weights_storage.data_ptr()
    parking = snapshot.EngineParking(e)
    stats = parking.park()
    assert parking.parked and parking.weights.host_bytes == e.weights_storage.numel()
    parking.wake()
    assert e.weights_storage.data_ptr() == ptr
    assert tokens(e) == before
    assert stats.wake_s > 0


def test_park_refuses_a_busy_engine(tiny):
    e = Engine.from_pretrained(tiny)
    h = e.submit(e.tokenizer.encode("busy"), SamplingParams(max_tokens=50, ignore_eos=True))
    e.step()
    with pytest.raises(RuntimeError, match="in flight"):
        snapshot.EngineParking(e).park()
    h.cancel()


def test_engine_from_http_source(tiny, tmp_path, monkeypatch):
    from tests.weights._servers import RangeServer

    import shutil

    root = tmp_path / "www"
    shutil.copytree(tiny, root / "tiny")
    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(tmp_path / "cache"))
    srv = RangeServer(str(root))
    try:
        e = Engine.from_pretrained(f"{srv.url}/tiny")
        assert e.model_name == "tiny"
        assert tokens(e) == tokens(Engine.from_pretrained(tiny))
    finally:
        srv.close()


@pytest.mark.gpu
def test_cuda_image_park_wake_graphs(tiny, tmp_path, env):
    out = str(tmp_path / "cuda-image")
    r = subprocess.run([sys.executable, "-m", "zerostart", "snapshot", "--model", tiny, "--out", out, "--device", "cuda"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    e = Engine.from_pretrained(out, device="cuda", allocator=snapshot.vmm_allocator)
    assert len(e.runner._graphs) > 0
    before = tokens(e)
    parking = snapshot.EngineParking(e)
    free0 = torch.cuda.mem_get_info()[0]
    parking.park()
    assert torch.cuda.mem_get_info()[0] > free0
    parking.wake()
    assert tokens(e) == before, "outputs after waking equal those before parking (graphs intact)"
