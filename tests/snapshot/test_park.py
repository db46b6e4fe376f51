import subprocess
import sys
import textwrap

import pytest
import torch

from zerostart.snapshot import Parking
from zerostart.weights._io import Region


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("kind", ["region", "torch"])
def test_cpu_park_keeps_addresses_and_bytes(kind):
    n = 64 << 20
    if kind == "region":
        r = Region.anonymous(n)
        storage = r.tensor()[:n]
    else:
        storage = torch.empty(n, dtype=torch.uint8)
    storage.copy_(torch.randint(0, 255, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    view = storage[1000:2000].view(torch.int32)  # a parameter-like view
    before = view.clone()
    ptr = storage.data_ptr()
    expect = storage.clone()
    p = Parking(storage)
    rss0 = rss_kb()
    p.park(keep=True)
    assert p.parked and p.host_bytes == n
    assert rss_kb() < rss0 - (n >> 10) // 2, "the allocation's pages went back to the kernel"
    p.wake()
    assert storage.data_ptr() == ptr
    assert torch.equal(storage, expect)
    assert torch.equal(view, before), "views made before parking see the same bytes after waking"
    assert p.stats.wake_s > 0 and p.stats.park_s > 0


def test_cpu_park_without_keeping_drops_contents():
    n = 8 << 20
    storage = torch.ones(n, dtype=torch.uint8)
    p = Parking(storage)
    p.park(keep=False)
    assert p.host_bytes == 0
    p.wake()
    # the page-aligned interior reads as zeros (fresh pages), never garbage
    inner = storage[4096 : n - 4096]
    assert int(inner.max()) == 0


def test_park_twice_and_wake_twice_are_harmless():
    storage = torch.arange(1 << 20, dtype=torch.int64).view(torch.uint8)
    expect = storage.clone()
    p = Parking(storage)
    p.park()
    p.park()
    p.wake()
    p.wake()
    assert torch.equal(storage, expect)


def rollup_kb(field: str) -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in smaps_rollup")


def test_cpu_wake_maps_the_parked_bytes_back_without_new_memory():
    n = 64 << 20
    r = Region.anonymous(n + 8192)
    storage = r.tensor()[100 : 100 + n]  # not page-aligned: the edge pages stay where they are
    storage.copy_(torch.randint(0, 255, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)))
    expect = storage.clone()
    p = Parking(storage)
    p.park(keep=True)
    anon = rollup_kb("Anonymous")
    p.wake()
    assert torch.equal(storage, expect)
    assert rollup_kb("Anonymous") - anon < (n >> 10) // 8, "waking allocated new anonymous memory"
    # the allocation is now the parked file: a write survives the next park without a copy
    storage[12345] = expect[12345] ^ 0xFF
    expect[12345] ^= 0xFF
    p.park(keep=True)
    assert p.stats.park_s > 0
    p.wake()
    assert torch.equal(storage, expect)
    # dropping the bytes after that puts fresh zeroed memory back, not the file's old bytes
    p.park(keep=False)
    p.wake()
    start = -(-storage.data_ptr() // 4096) * 4096 - storage.data_ptr()
    inner = storage[start : start + (n - 8192) // 4096 * 4096]
    assert inner.numel() > 0 and int(inner.max()) == 0
    assert torch.equal(storage[:start], expect[:start]), "bytes outside the page-aligned span never move"


def _parked_files_mapped() -> int:
    with open("/proc/self/maps") as f:
        return sum("zerostart-parked" in line for line in f)


def test_a_woken_allocation_takes_its_pages_back_as_its_own():
    """``own_pages`` after a CPU wake: the parked file's pages replaced by private memory holding
    the same bytes at the same addresses, the file closed; the next park copies the bytes out
    again, and the wake after it brings them back."""
    n = 32 << 20
    r = Region.anonymous(n + 8192)
    storage = r.tensor()[100 : 100 + n]
    storage.copy_(torch.randint(0, 255, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)))
    expect, ptr = storage.clone(), storage.data_ptr()
    p = Parking(storage)
    assert p.own_pages() == 0  # never parked: nothing to take back
    p.park(keep=True)
    assert p.own_pages() == 0  # parked: nothing mapped to take
    p.wake()
    mapped = _parked_files_mapped()
    assert mapped >= 1
    span = (ptr + n) // 4096 * 4096 - -(-ptr // 4096) * 4096  # the page-aligned part parking moves
    assert p.own_pages() == span
    assert _parked_files_mapped() == mapped - 1 and p.host_bytes == 0
    assert storage.data_ptr() == ptr and torch.equal(storage, expect)
    assert p.own_pages() == 0
    storage[777] = expect[777] ^ 0xFF
    expect[777] ^= 0xFF
    p.park(keep=True)
    p.wake()
    assert torch.equal(storage, expect)


def test_cuda_tensor_needs_vmm():
    class Fake:
        device = torch.device("cuda")

        def numel(self):
            return 1

        def element_size(self):
            return 1

    with pytest.raises(ValueError, match="VmmBuffer"):
        Parking(Fake())


# --- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_vmm_park_wake_same_address_and_graph_replay():
    from zerostart.snapshot import buffer_of, vmm_allocator

    n = 256 << 20
    storage = vmm_allocator(n, "cuda")
    buf = buffer_of(storage)
    assert buf is not None
    w = storage[: 4096 * 4].view(torch.float32).view(64, 64)
    w.copy_(torch.randn(64, 64, device="cuda"))
    x = torch.randn(8, 64, device="cuda")
    y = torch.empty(8, 64, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.matmul(x, w, out=y)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        torch.matmul(x, w, out=y)
    g.replay()
    before = y.clone()
    free0 = torch.cuda.mem_get_info()[0]
    p = Parking(storage, vmm=buf)
    p.park(keep=True)
    assert torch.cuda.mem_get_info()[0] > free0 + n // 2, "device memory was released"
    p.wake()
    assert storage.data_ptr() == buf.ptr
    y.zero_()
    g.replay()  # the graph reads w at its captured address
    torch.cuda.synchronize()
    assert torch.equal(y, before)
    assert p.stats.wake_gbps > 0


@pytest.mark.gpu
def test_foreign_process_suspend_resume(tmp_path):
    from zerostart import snapshot

    code = textwrap.dedent("""
        import sys, torch, time
        x = torch.arange(64 << 20, device="cuda", dtype=torch.int32)
        torch.cuda.synchronize()
        print("ready", flush=True)
        sys.stdin.readline()
        print(int(torch.equal(x, torch.arange(64 << 20, device="cuda", dtype=torch.int32))), flush=True)
    """)
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        _suspend_resume(proc, snapshot)


def _suspend_resume(proc, snapshot) -> None:
    try:
        assert proc.stdout.readline().strip() == "ready"
        free0 = torch.cuda.mem_get_info()[0]
        snapshot.suspend(proc.pid)
        assert snapshot.state(proc.pid) == "checkpointed"
        assert torch.cuda.mem_get_info()[0] > free0 + (128 << 20), "the process's device memory was released"
        snapshot.resume(proc.pid)
        assert snapshot.state(proc.pid) == "running"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "1", "its data survived"
    finally:
        proc.kill()
        proc.wait()
