import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.weights._files import entry, raw_file
from zerostart import weights
from zerostart.weights import LoadConfig, WeightsError

CONFIGS = {
    "auto": LoadConfig(),
    "mmap": LoadConfig(mmap="always"),
    "buffered": LoadConfig(mmap="never", direct_io="never"),
    "direct": LoadConfig(mmap="never", direct_io="always"),
    "small-chunks": LoadConfig(mmap="never", direct_io="never", chunk_bytes=4096, threads=3),
    "tiny-staging": LoadConfig(mmap="never", direct_io="always", chunk_bytes=1 << 20, staging_bytes=64 << 10),
}


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "f32": torch.randn(17, 3, generator=g),
        "f16": torch.randn(9, dtype=torch.float16, generator=g),
        "bf16": torch.randn(4, 33, generator=g).bfloat16(),
        "i64": torch.randint(-2**62, 2**62, (7,), generator=g),
        "i32": torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32, generator=g),
        "i16": torch.randint(-2**15, 2**15 - 1, (5,), dtype=torch.int16, generator=g),
        "i8": torch.randint(-128, 127, (11,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(19, generator=g) > 0.5,
        "f8_e4m3": torch.randn(23, generator=g).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(6, 2, generator=g).to(torch.float8_e5m2),
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "big": torch.randn(256, 1024, generator=g),
    }
    for name in ("uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            out[name] = torch.randint(0, 2**15, (4,), dtype=torch.int64, generator=g).to(getattr(torch, name))
    return out


def assert_same(got: dict, ref: dict, cast=None):
    assert set(got) == set(ref)
    for k, v in ref.items():
        exp = v.to(cast) if cast is not None and v.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else v
        assert got[k].dtype == exp.dtype, k
        assert got[k].shape == exp.shape, k
        # bit-exact: compare the raw bytes
        a, b = got[k].contiguous().view(-1), exp.contiguous().view(-1)
        if a.numel():
            assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a.view(-1).view(torch.uint8),
                               b.view(torch.uint8) if b.dtype.itemsize == 1 else b.view(-1).view(torch.uint8)), k


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    p = tmp_path_factory.mktemp("single") / "model.safetensors"
    save_file(every_dtype(), str(p))
    return p


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    tensors = every_dtype()
    names = sorted(tensors)
    shards = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(d / fname))
        weight_map.update({n: fname for n in group})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_bit_exact_with_safetensors_every_dtype(single, cfg):
    assert_same(weights.load(single, config=cfg), load_file(str(single)))


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_sharded_directory(sharded, cfg):
    ref = {}
    for f in sorted(os.listdir(sharded)):
        if f.endswith(".safetensors"):
            ref.update(load_file(str(sharded / f)))
    assert_same(weights.load(sharded, config=cfg), ref)


@pytest.mark.parametrize("cast", [torch.float32, torch.float16, torch.bfloat16, "float64"])
@pytest.mark.parametrize("cfg", ["auto", "direct", "small-chunks", "tiny-staging"])
def test_dtype_cast_during_load(sharded, cast, cfg):
    ref = {}
    for f in sorted(os.listdir(sharded)):
        if f.endswith(".safetensors"):
            ref.update(load_file(str(sharded / f)))
    got = weights.load(sharded, dtype=cast, config=CONFIGS[cfg])
    assert_same(got, ref, cast=getattr(torch, cast) if isinstance(cast, str) else cast)


def test_one_arena_all_views(sharded):
    arena = weights.load_arena(sharded)
    base = arena.storage.data_ptr()
    end = base + arena.storage.numel()
    for name, t in arena.tensors.items():
        assert t.untyped_storage().data_ptr() == arena.storage.untyped_storage().data_ptr(), name
        if t.numel():
            assert base <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end, name
    assert arena.stats.files == 3 and arena.stats.bytes == sum(t.numel() * t.element_size() for t in arena.tensors.values())


def test_directory_with_single_file(tmp_path):
    save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(weights.load(tmp_path)["w"], torch.ones(3))


def test_staging_stays_within_budget(tmp_path):
    save_file({f"w{i}": torch.randn(128, 1024) for i in range(8)}, str(tmp_path / "model.safetensors"))  # 4 MiB
    budget = 256 << 10
    arena = weights.load_arena(tmp_path, dtype=torch.float16, config=LoadConfig(staging_bytes=budget, chunk_bytes=1 << 20))
    assert 0 < arena.stats.staging_peak_bytes <= arena.stats.staging_bytes <= budget
    assert arena.stats.layout == "packed"


def test_unaligned_tensor_offsets(tmp_path):
    # A legal file whose data section starts at an odd offset: every f32 is off its alignment.
    values = torch.arange(6, dtype=torch.float32)
    hdr = {"a": entry("U8", [1], 0, 1), "w": entry("F32", [6], 1, 25)}
    blob = raw_file(hdr, b"\x07" + values.numpy().tobytes(), pad_to=0)
    p = tmp_path / "odd.safetensors"
    p.write_bytes(blob)
    for cfg in CONFIGS.values():
        for dt in (None, torch.float64):
            got = weights.load(p, dtype=dt, config=cfg)
            assert torch.equal(got["w"], values.to(dt or torch.float32)) and got["a"].item() == 7


def test_progress_reports_every_byte(sharded):
    seen = []
    arena = weights.load_arena(sharded, config=LoadConfig(mmap="never", chunk_bytes=4096), progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (arena.stats.bytes, arena.stats.bytes)
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:])) or sorted(seen) == sorted(seen)


def test_mapped_load_reports_every_byte_once(sharded):
    weights.load(sharded)  # now wholly in the page cache
    seen = []
    arena = weights.load_arena(sharded, config=LoadConfig(mmap="always"), progress=lambda d, t: seen.append((d, t)))
    assert arena.stats.strategy == {"mmap": 3}
    assert seen and seen[-1] == (arena.stats.bytes, arena.stats.bytes)
    assert all(d <= t for d, t in seen)


def test_cpu_arena_places_files_on_huge_page_boundaries(sharded):
    from zerostart.weights._io import HUGE

    arena = weights.load_arena(sharded)
    assert arena.storage.data_ptr() % HUGE == 0
    assert all(b % HUGE == 0 for b in arena.layout.file_base)
    assert_same(arena.tensors, every_dtype())


def test_residency_sampling_tracks_the_exact_count(tmp_path, monkeypatch):
    from zerostart.weights import _io

    monkeypatch.setattr(_io, "_SAMPLE_WINDOWS", 8)
    monkeypatch.setattr(_io, "_SAMPLE_BYTES", 64 << 10)
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(8 << 20))
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
        os.pread(fd, 4 << 20, 0)  # the first half only
        exact = _io.residency(fd, 8 << 20, exact=True)
        sampled = _io.residency(fd, 8 << 20)
    finally:
        os.close(fd)
    if exact > 0.9:
        pytest.skip("the page cache kept the file (eviction not permitted here)")
    assert 0.3 < exact < 0.8 and abs(sampled - exact) < 0.2, (exact, sampled)


def test_background_load_and_wait(sharded):
    arena = weights.load_arena(sharded, config=LoadConfig(mmap="never", chunk_bytes=4096, threads=2), background=True)
    arena.wait(["big"])
    assert arena.is_ready("big")
    arena.wait()
    assert arena.done
    assert arena.stats.total_s > 0


def test_mapped_tensors_are_copy_on_write(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4096)}, str(p))
    before = p.read_bytes()
    arena = weights.load_arena(p, config=LoadConfig(mmap="always"))
    assert arena.stats.strategy == {"mmap": 1}
    arena.tensors["w"] += 1
    assert p.read_bytes() == before
    assert torch.equal(weights.load(p)["w"], torch.zeros(4096))


def _files_mapped_in(start: int, end: int) -> set[str]:
    """The files with pages mapped in [start, end) of this process."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            span, _, _, _, _, *path = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in span.split("-"))
            if path and path[0].startswith("/") and lo < end and hi > start:
                out.add(path[0].strip())
    return out


def test_a_mapped_arena_takes_its_pages_as_its_own(sharded):
    """``Arena.own_pages`` puts memory of the arena's own holding the same bytes in place of the
    files mapped into it: every tensor keeps its address and its values, no file stays mapped,
    the files are untouched, and a write no longer has a file page to copy."""
    arena = weights.load_arena(sharded, config=LoadConfig(mmap="always"))
    assert arena.stats.strategy == {"mmap": 3}
    start = arena.storage.data_ptr()
    shards = {str(p): p for p in sharded.glob("*.safetensors")}
    assert _files_mapped_in(start, start + arena.nbytes) == set(shards)
    before = {p.read_bytes() for p in shards.values()}
    where = {k: t.data_ptr() for k, t in arena.tensors.items()}

    assert arena.own_pages() >= arena.stats.bytes
    assert _files_mapped_in(start, start + arena.nbytes) == set()
    assert {k: t.data_ptr() for k, t in arena.tensors.items()} == where
    assert_same(arena.tensors, every_dtype())
    assert arena.own_pages() == 0  # nothing mapped is left
    arena.tensors["big"] += 1
    assert {p.read_bytes() for p in shards.values()} == before


def test_a_region_takes_a_mapped_range_off_the_huge_page_grid(tmp_path):
    """A file mapped one page past a 2 MiB boundary, moved in pieces: the stretch before the
    next boundary, whole pieces, and a tail shorter than a piece."""
    from zerostart.weights._io import HUGE, PAGE, Region

    data = os.urandom(5 * HUGE + 3 * PAGE + 100)
    p = tmp_path / "blob"
    p.write_bytes(data)
    region = Region.reserve(8 * HUGE)
    fd = os.open(p, os.O_RDONLY)
    try:
        region.map_file(PAGE, fd, len(data))
    finally:
        os.close(fd)
    view = region.buffer(PAGE, len(data))
    assert bytes(view) == data and _files_mapped_in(region.addr, region.addr + region.size) == {str(p)}
    assert region.own_mapped_pages(piece=2 * HUGE) == -(-len(data) // PAGE) * PAGE
    assert bytes(view) == data and _files_mapped_in(region.addr, region.addr + region.size) == set()
    region.close()


def test_stats_are_reported(single):
    arena = weights.load_arena(single, config=CONFIGS["direct"])
    s = arena.stats.to_dict()
    assert s["bytes"] > 0 and s["total_s"] > 0 and s["read_s"] > 0 and s["gbps"] > 0
    assert s["strategy"] == {"direct": 1} and s["threads"] >= 1


# --- checkpoint errors -------------------------------------------------------------------------

def test_index_naming_missing_shard(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(WeightsError, match="names shard 's2.safetensors', which is missing"):
        weights.load(tmp_path)


def test_index_tensor_absent_from_its_shard(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "zz": "s1.safetensors"}}))
    with pytest.raises(WeightsError, match="tensor 'zz' is absent from the shard it names \\(s1.safetensors\\)"):
        weights.load(tmp_path)


def test_index_malformed(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(WeightsError, match="not a valid JSON index"):
        weights.load(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    with pytest.raises(WeightsError, match="malformed 'weight_map'"):
        weights.load(tmp_path)


def test_index_shard_outside_directory(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(WeightsError, match="which is missing"):
        weights.load(tmp_path)


def test_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(WeightsError, match="no model.safetensors or model.safetensors.index.json here"):
        weights.load(tmp_path)
    with pytest.raises(WeightsError, match="no such file or directory"):
        weights.load(tmp_path / "nope")


def test_truncated_shard_is_named(tmp_path):
    save_file({"a": torch.ones(100)}, str(tmp_path / "model.safetensors"))
    blob = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[:-10])
    with pytest.raises(WeightsError, match="model.safetensors: tensor 'a' ends at byte 400"):
        weights.load(tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dtype"):
        weights.load("x.safetensors", dtype="float7")
    with pytest.raises(ValueError, match="unsupported device"):
        weights.load("x.safetensors", device="meta")
    with pytest.raises(ValueError, match="LoadConfig.mmap"):
        LoadConfig(mmap="sometimes")


# --- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("cfg", ["auto", "direct", "buffered", "small-chunks", "tiny-staging"])
@pytest.mark.parametrize("cast", [None, torch.float32, torch.bfloat16])
def test_cuda_load_matches(sharded, cfg, cast):
    ref = {}
    for f in sorted(os.listdir(sharded)):
        if f.endswith(".safetensors"):
            ref.update(load_file(str(sharded / f)))
    arena = weights.load_arena(sharded, device="cuda", dtype=cast, config=CONFIGS[cfg])
    assert arena.storage.is_cuda
    from zerostart.weights._load import _CUDA_STAGING

    assert arena.stats.staging_peak_bytes <= arena.stats.staging_bytes <= (CONFIGS[cfg].staging_bytes or _CUDA_STAGING)
    assert_same({k: v.cpu() for k, v in arena.tensors.items()}, ref, cast=cast)


@pytest.mark.gpu
def test_cuda_background_load_and_progress(sharded):
    ref = {}
    for f in sorted(os.listdir(sharded)):
        if f.endswith(".safetensors"):
            ref.update(load_file(str(sharded / f)))
    seen = []
    arena = weights.load_arena(sharded, device="cuda", config=LoadConfig(chunk_bytes=64 << 10, threads=4), background=True,
                               progress=lambda d, t: seen.append(d))
    arena.wait(["big"])
    assert torch.equal(arena.tensors["big"].cpu(), ref["big"])
    arena.wait()
    assert seen[-1] == arena.stats.bytes


# --- checksums ----------------------------------------------------------------------------------

def _aligned_file(tmp_path, n_mb=9):
    """A file whose data section starts at 4096 (as ready images are written), with checksums."""
    from zerostart.weights import _checksums

    g = torch.Generator().manual_seed(3)
    t = {"a": torch.randn(n_mb << 18, generator=g), "b": torch.arange(1000, dtype=torch.int32)}
    import json as _json
    import struct

    hdr = {}
    off = 0
    for k in ("a", "b"):
        n = t[k].numel() * t[k].element_size()
        hdr[k] = {"dtype": {torch.float32: "F32", torch.int32: "I32"}[t[k].dtype], "shape": list(t[k].shape), "data_offsets": [off, off + n]}
        off += n
    raw = _json.dumps(hdr).encode()
    raw += b" " * (4096 - 8 - len(raw))
    p = tmp_path / "model.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in ("a", "b"):
            f.write(t[k].numpy().tobytes())
    _checksums.write(str(tmp_path), [_checksums.compute(str(p), 4096, block_bytes=1 << 20)])
    return p, t


@pytest.mark.parametrize("cfg", ["auto", "mmap", "direct", "buffered"])
def test_checksums_verified_while_loading(tmp_path, cfg):
    p, ref = _aligned_file(tmp_path)
    arena = weights.load_arena(tmp_path, config=CONFIGS[cfg])
    assert torch.equal(arena.tensors["a"], ref["a"]) and torch.equal(arena.tensors["b"], ref["b"])
    assert arena.stats.verified_bytes == p.stat().st_size - 4096
    assert arena.stats.verify_s > 0


@pytest.mark.parametrize("cfg", ["auto", "mmap", "direct", "buffered"])
def test_flipped_byte_is_detected(tmp_path, cfg):
    p, _ = _aligned_file(tmp_path)
    blob = bytearray(p.read_bytes())
    blob[4096 + 3 * (1 << 20) + 12345] ^= 0x40
    p.write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match=r"block 3 \(bytes 3149824\.\.4198400\) fails its checksum"):
        weights.load(tmp_path, config=CONFIGS[cfg])


def test_truncated_checksummed_file_is_detected(tmp_path):
    p, _ = _aligned_file(tmp_path)
    blob = p.read_bytes()
    p.write_bytes(blob[:-4000])
    with pytest.raises(WeightsError):
        weights.load(tmp_path)


def test_checksums_with_a_cast(tmp_path):
    p, ref = _aligned_file(tmp_path)
    got = weights.load(tmp_path, dtype=torch.float64)
    assert torch.equal(got["a"], ref["a"].double())
    blob = bytearray(p.read_bytes())
    blob[-10] ^= 1
    p.write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="fails its checksum"):
        weights.load(tmp_path, dtype=torch.float64)


def test_verify_never_skips_checks(tmp_path):
    p, _ = _aligned_file(tmp_path)
    blob = bytearray(p.read_bytes())
    blob[5000] ^= 1
    p.write_bytes(bytes(blob))
    arena = weights.load_arena(tmp_path, config=LoadConfig(verify="never"))
    assert arena.stats.verified_bytes == 0


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", ["auto", "direct"])
def test_cuda_checksums(tmp_path, cfg):
    p, ref = _aligned_file(tmp_path)
    arena = weights.load_arena(tmp_path, device="cuda", config=CONFIGS[cfg])
    assert torch.equal(arena.tensors["a"].cpu(), ref["a"])
    assert arena.stats.verified_bytes == p.stat().st_size - 4096
    blob = bytearray(p.read_bytes())
    blob[4096 + 7] ^= 1
    p.write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="block 0 .* fails its checksum"):
        weights.load(tmp_path, device="cuda", config=CONFIGS[cfg])


def test_cached_fraction_follows_one_file_leaving_the_cache(tmp_path):
    from zerostart import weights

    one, other = tmp_path / "one", tmp_path / "other"
    for p in (one, other):
        p.write_bytes(os.urandom(4 << 20))
        with open(p, "rb") as f:
            f.read()  # both read: in the page cache
    if weights.cached_fraction(str(one)) < 0.9:
        pytest.skip("the page cache did not keep a file just read")
    (ev,) = weights.evict_page_cache([str(one)])
    assert ev.resident_after < 0.01 and weights.cached_fraction(str(one)) < 0.01
    assert weights.cached_fraction(str(other)) > 0.9  # not the whole cache
