"""reserve_host: host memory faulted in ahead, taken by the next CPU load as its arena."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.weights.test_load import assert_same, every_dtype
from zerostart import weights
from zerostart.weights._io import HUGE, evict_page_cache

MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_reserve_left():
    weights.release_host()
    yield
    weights.release_host()


def _checkpoint(d, mib_per_shard=(5, 6)):
    """A sharded checkpoint of a few MiB (bigger than one huge page) plus its reference tensors."""
    g = torch.Generator().manual_seed(1)
    ref, weight_map = {}, {}
    for i, mib in enumerate(mib_per_shard):
        part = {f"layer{i}.w": torch.randn(mib * MiB // 4, generator=g), f"layer{i}.b": torch.randn(7, generator=g).bfloat16()}
        name = f"model-{i + 1:05d}-of-{len(mib_per_shard):05d}.safetensors"
        save_file(part, str(d / name))
        ref.update(part)
        weight_map.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ref, sorted(str(p) for p in d.glob("*.safetensors"))


def _cold(files) -> bool:
    return all(e.resident_after < 0.01 for e in evict_page_cache(files))


def test_reserve_is_faulted_in_and_released():
    assert weights.reserved_host() == 0
    seconds = weights.reserve_host(3 * MiB)
    assert seconds >= 0
    assert weights.reserved_host() == 2 * HUGE  # rounded up to whole huge pages
    weights.reserve_host(0)
    assert weights.reserved_host() == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True])
def test_reserve_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="nbytes"):
        weights.reserve_host(bad)
    with pytest.raises(ValueError, match="threads"):
        weights.reserve_host(MiB, threads=0)


def test_cold_files_are_read_into_a_larger_reserve(tmp_path):
    ref, files = _checkpoint(tmp_path)
    weights.reserve_host(64 * MiB)
    cold = _cold(files)
    arena = weights.load_arena(tmp_path)
    assert_same(arena.tensors, ref)
    assert weights.reserved_host() == 0  # taken by the load
    # the arena is the reserve, cut to the arena's size; the rest went back
    assert arena.stats.prefaulted_bytes == arena.storage.numel() >= arena.stats.arena_bytes
    assert arena.storage.numel() < 64 * MiB
    if cold:  # cold files are read into the reserve, not mapped
        assert arena.stats.strategy == {"direct": 2}
        assert arena.writable


def test_a_smaller_reserve_serves_the_first_bytes(tmp_path):
    ref, files = _checkpoint(tmp_path, (3, 4))
    weights.reserve_host(HUGE)
    _cold(files)
    arena = weights.load_arena(tmp_path)
    assert arena.stats.prefaulted_bytes == HUGE < arena.storage.numel()
    assert_same(arena.tensors, ref)
    # every byte of the grown arena is ordinary writable memory, the moved pages and the new ones
    if arena.writable:
        arena.storage.fill_(7)
        assert int(arena.storage[0]) == 7 and int(arena.storage[-1]) == 7
        assert int(arena.storage.sum()) == 7 * arena.storage.numel()


def test_warm_files_are_still_mapped_over_a_reserve(tmp_path):
    ref, files = _checkpoint(tmp_path)
    for f in files:  # make sure the page cache holds them
        with open(f, "rb") as fh:
            while fh.read(8 * MiB):
                pass
    weights.reserve_host(64 * MiB)
    arena = weights.load_arena(tmp_path)
    assert arena.stats.strategy == {"mmap": 2}
    assert arena.stats.prefaulted_bytes > 0
    assert_same(arena.tensors, ref)


def test_a_cast_writes_into_the_reserve(tmp_path):
    ref, files = _checkpoint(tmp_path)
    weights.reserve_host(64 * MiB)
    _cold(files)
    arena = weights.load_arena(tmp_path, dtype=torch.float16)
    assert arena.stats.layout == "packed" and arena.stats.prefaulted_bytes > 0
    assert_same(arena.tensors, ref, cast=torch.float16)


def test_only_the_next_load_takes_it(tmp_path):
    p = tmp_path / "one.safetensors"
    save_file(every_dtype(), str(p))
    weights.reserve_host(4 * MiB)
    first = weights.load_arena(p)
    second = weights.load_arena(p)
    assert first.stats.prefaulted_bytes > 0 and second.stats.prefaulted_bytes == 0
    assert_same(second.tensors, load_file(str(p)))


@pytest.mark.gpu
def test_cuda_loads_leave_the_reserve(tmp_path):
    ref, _ = _checkpoint(tmp_path)
    weights.reserve_host(4 * MiB)
    arena = weights.load_arena(tmp_path, device="cuda")
    assert weights.reserved_host() == 4 * MiB and arena.stats.prefaulted_bytes == 0
    assert_same({k: v.cpu() for k, v in arena.tensors.items()}, ref)
