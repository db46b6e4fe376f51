"""Measure each way bytes can go from the page cache to GPU memory, one stage at a time.

    python bench/h2d_paths.py FILE [--json OUT]

FILE should be a few GB and already in the page cache. Prints GB/s for: pread into pinned
memory (threads x chunk), populating a mapping, copying a mapping into pinned memory with
torch, pinned -> device copies on one and two streams, pageable (mapped) -> device copies from
several threads, and the cost of allocating / registering pinned memory. This is how the CUDA
load path's design and defaults were chosen; rerun it on new hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zerostart.weights import Region, pread_into  # noqa: E402


def gbps(n: int, s: float) -> float:
    return round(n / s / 1e9, 2)


def pread_pinned(path: str, threads: int, chunk: int, pinned: torch.Tensor) -> float:
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    slots = pinned.numel() // chunk
    offs = list(range(0, size, chunk))
    mv = pinned.numpy().data.cast("B")
    t0 = time.perf_counter()

    def rd(i):
        s = (i % slots) * chunk
        pread_into(fd, mv[s : s + chunk], offs[i], size, path)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(rd, range(len(offs))))
    dt = time.perf_counter() - t0
    os.close(fd)
    return gbps(size, dt)


def _from_mapping(src: torch.Tensor, size: int, pinned: torch.Tensor, out: dict) -> None:
    """mapping -> pinned (torch), pinned -> device, mapping -> device (pageable). Every tensor over the
    mapping or on the device here is gone when this returns, before the caller unmaps the file."""
    # mapping -> pinned with torch (user-space memcpy), per-thread chunks
    r = {}
    for threads in (4, 8, 16):
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        chunk = 32 << 20
        slots = pinned.numel() // chunk
        t0 = time.perf_counter()

        def cp(i):
            o = i * chunk
            n = min(chunk, size - o)
            s = (i % slots) * chunk
            pinned[s : s + n].copy_(src[o : o + n])

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(cp, range((size + chunk - 1) // chunk)))
        r[f"t{threads}"] = gbps(size, time.perf_counter() - t0)
        torch.set_num_threads(prev)
    out["mapping_to_pinned_torch_gbps"] = r
    print("mapping->pinned", r, flush=True)

    # pinned -> device
    dev = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dev.copy_(pinned, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(4):
        dev.copy_(pinned, non_blocking=True)
    torch.cuda.synchronize()
    out["pinned_h2d_1stream_gbps"] = gbps(4 << 30, time.perf_counter() - t0)
    streams = [torch.cuda.Stream() for _ in range(2)]
    t0 = time.perf_counter()
    for i in range(8):
        with torch.cuda.stream(streams[i % 2]):
            dev[(i % 2) * (512 << 20) : (i % 2 + 1) * (512 << 20)].copy_(pinned[(i % 2) * (512 << 20) : (i % 2 + 1) * (512 << 20)], non_blocking=True)
    torch.cuda.synchronize()
    out["pinned_h2d_2streams_gbps"] = gbps(4 << 30, time.perf_counter() - t0)
    for chunk_mb in (8, 32):
        chunk = chunk_mb << 20
        t0 = time.perf_counter()
        for i in range((4 << 30) // chunk):
            o = (i * chunk) % (1 << 30)
            dev[o : o + chunk].copy_(pinned[o : o + chunk], non_blocking=True)
        torch.cuda.synchronize()
        out[f"pinned_h2d_chunks{chunk_mb}MB_gbps"] = gbps(4 << 30, time.perf_counter() - t0)
    print("pinned->device", {k: v for k, v in out.items() if k.startswith("pinned_h2d")}, flush=True)

    # pageable (mapped page cache) -> device, several threads each with its own stream
    big = torch.empty(size, dtype=torch.uint8, device="cuda")
    r = {}
    for threads in (1, 4, 8):
        chunk = 32 << 20
        ss = [torch.cuda.Stream() for _ in range(threads)]
        t0 = time.perf_counter()

        def h2d(i):
            o = i * chunk
            n = min(chunk, size - o)
            st = ss[i % threads]
            with torch.cuda.stream(st):
                big[o : o + n].copy_(src[o : o + n], non_blocking=True)
            st.synchronize()

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(h2d, range((size + chunk - 1) // chunk)))
        torch.cuda.synchronize()
        r[f"t{threads}"] = gbps(size, time.perf_counter() - t0)
    out["pageable_mapping_h2d_gbps"] = r
    print("mapping->device (pageable)", r, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--json")
    a = ap.parse_args()
    path = a.file
    size = os.path.getsize(path)
    out: dict = {"file_bytes": size, "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name()}
    torch.empty(1, device="cuda")

    t0 = time.perf_counter()
    pinned = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    out["cudaHostAlloc_1GiB_s"] = round(time.perf_counter() - t0, 4)
    t0 = time.perf_counter()
    small = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    out["cudaHostAlloc_256MiB_s"] = round(time.perf_counter() - t0, 4)
    del small
    reg = Region.anonymous(256 << 20)
    reg.tensor().fill_(0)
    t0 = time.perf_counter()
    err = torch.cuda.cudart().cudaHostRegister(reg.addr, 256 << 20, 0)
    out["cudaHostRegister_256MiB_anon_thp_s"] = round(time.perf_counter() - t0, 4)
    out["cudaHostRegister_err"] = int(err)
    torch.cuda.cudart().cudaHostUnregister(reg.addr)

    # page cache -> pinned (kernel copy), threads x chunk
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    r = {}
    for threads in (4, 8, 16, 32):
        for chunk_mb in (8, 32, 64):
            r[f"t{threads}_c{chunk_mb}"] = pread_pinned(path, threads, chunk_mb << 20, pinned)
    out["pread_to_pinned_gbps"] = r
    print("pread->pinned", r, flush=True)

    # populate a private mapping (parallel)
    fd = os.open(path, os.O_RDONLY)
    m = Region.reserve(size)
    m.map_file(0, fd, size)
    span = 64 << 20
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda o: m.populate(o, min(span, size - o)), range(0, size, span)))
    out["populate_16t_gbps"] = gbps(size, time.perf_counter() - t0)
    _from_mapping(m.tensor()[:size], size, pinned, out)
    m.close()
    os.close(fd)
    # end to end: zerostart's load path, in-process, with its phase statistics
    from zerostart import weights

    loads = {}
    for name, cfg in {
        "default": weights.LoadConfig(),
        "t8_c32": weights.LoadConfig(threads=8, chunk_bytes=32 << 20),
        "t16_c32_s1g": weights.LoadConfig(threads=16, chunk_bytes=32 << 20, staging_bytes=1 << 30),
        "t16_c64_s1g": weights.LoadConfig(threads=16, chunk_bytes=64 << 20, staging_bytes=1 << 30),
        "t32_c16_s1g": weights.LoadConfig(threads=32, chunk_bytes=16 << 20, staging_bytes=1 << 30),
    }.items():
        arena = weights.load_arena(path, "cuda", config=cfg)
        st = arena.stats
        loads[name] = {"gbps": round(st.gbps, 2), "setup_s": round(st.setup_s, 4), "read_s": round(st.read_s, 4),
                   "copy_s": round(st.copy_s, 4), "total_s": round(st.total_s, 4), "threads": st.threads,
                   "staging": st.staging_bytes, "strategy": st.strategy}
        print(name, loads[name], flush=True)
        del arena
        torch.cuda.empty_cache()
    out["zerostart_load"] = loads
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
