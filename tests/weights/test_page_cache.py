"""Evicting a model's own files from the page cache, and nothing else: ``weights.evict_page_cache``
(``fsync`` then ``POSIX_FADV_DONTNEED`` per file), checked with util-linux's ``fincore``
(``mincore``), which does not share our code."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from zerostart import weights
from zerostart.weights import _io

SIZE = 8 << 20


def cached_fraction(path: str) -> float:
    """The fraction of ``path`` in the page cache, as ``fincore`` counts it (our own count where
    util-linux is missing)."""
    if shutil.which("fincore"):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path], check=True,
                             capture_output=True, text=True).stdout
        return int(out.strip()) / os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return _io.residency(fd, os.fstat(fd).st_size, exact=True)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    """Read ``path`` twice: pages read again move to the kernel's active list, which memory
    pressure from other processes reclaims last."""
    for _ in range(2):
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def cached_file(path: str, size: int = SIZE) -> str:
    """A file of random bytes at ``path``, on disk and in the page cache (the test is skipped
    on a filesystem that keeps nothing there)."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    warm(path)
    if cached_fraction(path) < 0.9:
        pytest.skip("this filesystem does not keep files in the page cache")
    return path


@pytest.fixture
def files(tmp_path) -> tuple[str, str]:
    return cached_file(str(tmp_path / "model.safetensors")), cached_file(str(tmp_path / "someone-elses.bin"))


def test_evicts_the_files_and_leaves_the_bystander_cached(files: tuple[str, str]) -> None:
    model, bystander = files
    (e,) = weights.evict_page_cache([model])
    assert e.path == model and e.size == SIZE and e.resident_before > 0.9
    assert e.resident_after < 0.01 and e.left_bytes < SIZE // 100
    assert cached_fraction(model) < 0.01
    assert cached_fraction(bystander) > 0.99  # someone else's file keeps its cache


def test_dirty_pages_are_flushed_then_evicted(tmp_path) -> None:
    """A file just written (its pages dirty, not yet on disk) is evicted too: the helper flushes
    it first, as DONTNEED skips dirty pages."""
    path = str(tmp_path / "image.safetensors")
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))  # no fsync: the pages stay dirty for a while
    if cached_fraction(path) < 0.9:
        pytest.skip("this filesystem does not keep files in the page cache")
    (e,) = weights.evict_page_cache([path])
    assert e.resident_after < 0.01 and cached_fraction(path) < 0.01


def test_a_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        weights.evict_page_cache([str(tmp_path / "nothing-here")])
