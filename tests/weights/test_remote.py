import errno
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from tests.weights._servers import MotoServer, RangeServer
from zerostart import weights
from zerostart.weights import LoadConfig, ObjectChanged, SourceError, WeightsError
from zerostart.weights._cache import Cache
from zerostart.weights import _remote
from zerostart.weights._remote import RetryPolicy, Transport
from zerostart.weights._store_s3 import reset_credentials


def make_model(d, n_shards=2, seed=0):
    """A small sharded bf16 checkpoint with config and tokenizer files, as on the Hub."""
    g = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.layers.{i}.w": torch.randn(256, 512, generator=g).bfloat16() for i in range(6)}
    tensors["model.norm.weight"] = torch.ones(512, dtype=torch.bfloat16)
    names = sorted(tensors)
    wm = {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        weights.save_file(part, d / fname)
        wm.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 512}))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    return tensors


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(d))
    return d


@pytest.fixture
def served(tmp_path, monkeypatch):
    root = tmp_path / "www"
    tensors = make_model(root / "m")
    srv = RangeServer(str(root))
    monkeypatch.setattr(_remote, "DEFAULT_RETRY", RetryPolicy(attempts=4, backoff_s=0.01, timeout_s=5))
    yield srv, tensors
    srv.close()


def same(got, ref):
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_http_stream_then_cache(served, cache_dir):
    srv, ref = served
    url = f"{srv.url}/m"
    arena = weights.load_arena(url, config=LoadConfig(chunk_bytes=64 << 10))
    same(arena.tensors, ref)
    assert arena.stats.strategy == {"remote-mapped": 2}  # the cache file being written is the arena
    arena.wait_cached()
    snap = Cache().manifest(url)
    assert snap is not None and set(snap["objects"]) >= {"config.json", "model-00001-of-00002.safetensors"}
    sent = srv.bytes_sent
    # the next cold start reads the cache: no weight bytes cross the network again
    arena2 = weights.load_arena(url)
    same(arena2.tensors, ref)
    assert arena2.stats.strategy == {"mmap": 2}
    assert srv.bytes_sent - sent < 4096
    assert os.path.exists(os.path.join(weights.localize(url), "config.json"))


def test_streamed_arena_is_copy_on_write_over_the_cache(served, cache_dir):
    srv, ref = served
    url = f"{srv.url}/m"
    arena = weights.load_arena(url, config=LoadConfig(chunk_bytes=64 << 10))
    arena.wait_cached()
    for t in arena.tensors.values():
        if t.is_floating_point() and t.numel():
            t.add_(1)  # writes go to the process's own pages, never to the cached file
    same(weights.load(url), ref)
    assert srv.bytes_sent and Cache().manifest(url) is not None


def test_stream_without_cache_reads_into_memory(served, cache_dir):
    srv, ref = served
    arena = weights.load_arena(f"{srv.url}/m", config=LoadConfig(chunk_bytes=64 << 10, cache=False))
    same(arena.tensors, ref)
    assert arena.stats.strategy == {"remote": 2}


def test_http_cast_and_staged_path(served, cache_dir):
    srv, ref = served
    got = weights.load(f"{srv.url}/m", dtype=torch.float32, config=LoadConfig(chunk_bytes=64 << 10, cache=False))
    same(got, {k: v.float() for k, v in ref.items()})
    assert Cache().manifest(f"{srv.url}/m") is None  # cache=False wrote nothing


def test_server_dies_mid_stream_is_retried(served, cache_dir):
    srv, ref = served
    srv.faults.cut_after, srv.faults.cut_times = 10_000, 5
    same(weights.load(f"{srv.url}/m", config=LoadConfig(chunk_bytes=64 << 10, threads=2)), ref)
    assert srv.faults.cut_times == 0


def test_transient_503_is_retried(served, cache_dir):
    srv, ref = served
    srv.faults.fail_503 = 3
    same(weights.load(f"{srv.url}/m", config=LoadConfig(chunk_bytes=64 << 10, threads=1)), ref)


def test_slow_server_completes(served, cache_dir):
    srv, ref = served
    srv.faults.delay_per_mb = 0.05
    seen = []
    same(weights.load(f"{srv.url}/m", config=LoadConfig(chunk_bytes=128 << 10), progress=lambda d, t: seen.append(d)), ref)
    assert seen[-1] == sum(v.numel() * 2 for v in ref.values())


def test_range_that_keeps_failing_names_object_and_range(served, cache_dir):
    srv, _ = served
    srv.faults.fail_range_at = 200_000
    with pytest.raises(SourceError, match=r"model-0000\d-of-00002.safetensors: bytes \d+\.\.\d+ failed after 4 attempts"):
        weights.load(f"{srv.url}/m", config=LoadConfig(chunk_bytes=64 << 10))
    assert Cache().manifest(f"{srv.url}/m") is None
    blobs = Cache().blobs
    assert not any(n.endswith(".partial") for n in os.listdir(blobs)), "no partial file left behind"
    st = [n for n in os.listdir(blobs) if not n.endswith(".lock")]
    sizes = sorted(os.path.getsize(os.path.join(blobs, n)) for n in st)
    assert all(s < 10_000 for s in sizes), "only the small files became blobs"


def test_object_changed_during_load(served, cache_dir):
    srv, _ = served
    srv.faults.mutate = "model-00001-of-00002.safetensors"
    with pytest.raises(ObjectChanged, match="changed during the load"):
        weights.load(f"{srv.url}/m", config=LoadConfig(chunk_bytes=64 << 10, threads=1))
    assert Cache().manifest(f"{srv.url}/m") is None


def test_cache_disk_full_load_still_succeeds(served, cache_dir, monkeypatch, capfd):
    srv, ref = served
    real = os.posix_fallocate

    def full(fd, off, n):
        if n > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, off, n)

    monkeypatch.setattr(os, "posix_fallocate", full)
    same(weights.load(f"{srv.url}/m", config=LoadConfig(chunk_bytes=64 << 10)), ref)
    assert "not caching" in capfd.readouterr().err
    assert Cache().manifest(f"{srv.url}/m") is None


def test_cache_write_error_midway_abandons_blob(served, cache_dir, monkeypatch):
    srv, ref = served
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, off):
        calls["n"] += 1
        if calls["n"] > 3 and len(data) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", failing)
    arena = weights.load_arena(f"{srv.url}/m", config=LoadConfig(chunk_bytes=64 << 10))
    same(arena.tensors, ref)
    arena.wait_cached()
    monkeypatch.setattr(os, "pwrite", real)
    c = Cache()
    assert c.manifest(f"{srv.url}/m") is None
    assert not any(n.endswith(".partial") for n in os.listdir(c.blobs))


def test_concurrent_loads_share_one_transfer(served, cache_dir):
    srv, ref = served
    total = sum(v.numel() * 2 for v in ref.values())
    results, errors = [], []

    def go():
        try:
            arena = weights.load_arena(f"{srv.url}/m", config=LoadConfig(chunk_bytes=64 << 10, threads=2))
            arena.wait_cached()
            results.append(arena.tensors)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        same(r, ref)
    assert srv.bytes_sent < 1.5 * total, f"{srv.bytes_sent} bytes sent for a {total}-byte model"


def test_lru_eviction_and_cli(served, cache_dir, tmp_path):
    srv, _ = served
    make_model(tmp_path / "www" / "m2", seed=1)
    weights.pull(f"{srv.url}/m")
    weights.pull(f"{srv.url}/m2")
    c = Cache()
    assert c.manifest(f"{srv.url}/m") and c.manifest(f"{srv.url}/m2")
    c.touch(f"{srv.url}/m2")
    os.utime(os.path.join(c.snapshot_dir(f"{srv.url}/m"), "config.json"), follow_symlinks=True, times=(1, 1))
    for name in os.listdir(c.snapshot_dir(f"{srv.url}/m")):
        p = os.path.join(c.snapshot_dir(f"{srv.url}/m"), name)
        if os.path.islink(p):
            os.utime(os.path.realpath(p), (1, 1))
    one = c.total_bytes() // 2 + 1000
    c.gc(one)
    assert c.manifest(f"{srv.url}/m") is None and c.manifest(f"{srv.url}/m2") is not None
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "zerostart", "cache", "ls"], capture_output=True, text=True, env=env, check=True).stdout
    assert f"{srv.url}/m2" in out and "complete" in out
    subprocess.run([sys.executable, "-m", "zerostart", "cache", "rm", f"{srv.url}/m2"], check=True, env=env, capture_output=True)
    assert Cache().manifest(f"{srv.url}/m2") is None
    r = subprocess.run([sys.executable, "-m", "zerostart", "cache", "rm", "s3://nope/x"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "not in the cache" in r.stderr


def test_pull_cli_then_offline_load(served, cache_dir):
    srv, ref = served
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "zerostart", "pull", f"{srv.url}/m", "--part-size", "64KB"], capture_output=True,
                       text=True, env=env, check=True)
    snap = r.stdout.strip().splitlines()[-1]
    assert os.path.exists(os.path.join(snap, ".complete"))
    srv.close()  # the source goes away: the cached copy still loads
    same(weights.load(f"{srv.url}/m"), ref)


def test_http_errors_are_clear(served, cache_dir):
    srv, _ = served
    with pytest.raises(SourceError, match="neither model.safetensors nor model.safetensors.index.json"):
        weights.load(f"{srv.url}/nothing-here")


def test_hf_cache_resolution(tmp_path, monkeypatch):
    """A snapshot whole in the hub cache is used without the network (HF_HUB_OFFLINE makes any
    attempt to reach it an error)."""
    hub = tmp_path / "hub"
    snap = hub / "models--org--tiny" / "snapshots" / "abc123"
    ref = make_model(snap, n_shards=1)
    (hub / "models--org--tiny" / "refs").mkdir(parents=True)
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    same(weights.load("hf://org/tiny"), ref)
    same(weights.load("hf://org/tiny@abc123"), ref)
    assert weights.localize("hf://org/tiny") == str(snap)
    with pytest.raises(WeightsError, match="revision 'v2' of org/tiny is not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        weights.load("hf://org/tiny@v2")
    with pytest.raises(WeightsError, match="org/other is not in the Hugging Face cache"):
        weights.load("hf://org/other")


# --- S3 -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto():
    pytest.importorskip("moto")
    srv = MotoServer()
    yield srv
    srv.close()


@pytest.fixture
def s3(moto, tmp_path, monkeypatch):
    import boto3

    for k, v in {"AWS_ENDPOINT_URL": moto.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    reset_credentials()
    client = boto3.client("s3", endpoint_url=moto.url)
    bucket = f"b{abs(hash(str(tmp_path))) % 10**8}"
    client.create_bucket(Bucket=bucket)
    local = tmp_path / "model"
    ref = make_model(local)
    for f in os.listdir(local):
        client.upload_file(str(local / f), bucket, f"models/tiny/{f}")
    yield f"s3://{bucket}/models/tiny", ref
    reset_credentials()


def test_s3_load_and_cache(s3, cache_dir):
    url, ref = s3
    arena = weights.load_arena(url, config=LoadConfig(chunk_bytes=64 << 10))
    same(arena.tensors, ref)
    assert arena.stats.strategy == {"remote-mapped": 2}
    arena.wait_cached()
    assert Cache().manifest(url) is not None
    same(weights.load(url), ref)


def test_s3_wrong_credentials(s3, cache_dir, moto, monkeypatch):
    url, _ = s3
    moto.set_auth("0")  # from now on every request must be signed by a known IAM key
    try:
        with pytest.raises(SourceError, match="access denied.*check the credentials"):
            weights.load(url, config=LoadConfig(cache=False))
    finally:
        moto.set_auth("inf")


def test_s3_missing_bucket_and_prefix(s3, cache_dir):
    url, _ = s3
    with pytest.raises(SourceError, match="no such bucket|not found|NoSuchBucket"):
        weights.load("s3://no-such-bucket-zs/m")
    with pytest.raises(SourceError, match="no objects under this prefix"):
        weights.load(url + "-missing")


def test_transport_times_out_cleanly(served):
    srv, _ = served
    t = Transport(RetryPolicy(attempts=2, backoff_s=0.01, timeout_s=0.2))
    srv.faults.delay_per_mb = 50.0
    from zerostart.weights._store_http import head

    obj = head(f"{srv.url}/m/model-00001-of-00002.safetensors", t)
    buf = bytearray(1 << 20)
    with pytest.raises(SourceError, match="failed after 2 attempts"):
        t.read_range(obj, 0, memoryview(buf))
    srv.faults.delay_per_mb = 0.0
    t.close()


def test_offline_uses_the_cache_without_asking(served, cache_dir, monkeypatch):
    srv, ref = served
    weights.pull(f"{srv.url}/m")
    before = srv.requests
    monkeypatch.setenv("ZEROSTART_OFFLINE", "1")
    same(weights.load(f"{srv.url}/m"), ref)
    assert srv.requests == before, "no request reached the server"
    monkeypatch.delenv("ZEROSTART_OFFLINE")
    weights.load(f"{srv.url}/m")
    assert srv.requests > before, "online, the source is asked whether it changed"
