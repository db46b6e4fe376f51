"""One timed load in a fresh process: ``python -m zerostart.bench._load_trial '<json>'``.

A fresh process per trial keeps peak-memory readings honest (VmHWM only grows) and gives no
contestant a warm allocator. Imports happen before the clock starts. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

import xxhash

from zerostart.bench import _contestants
from zerostart.names import Scheme, source_scheme
from zerostart.weights import arena_bytes, reserve_host


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _touch(tensors: dict) -> int:
    """Read one byte per 4 KiB page of every CPU tensor (forces lazy mappings resident)."""
    # after main set the environment the contestants read when imported
    import torch

    total = 0
    for t in tensors.values():
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        b = flat.view(torch.uint8)
        total += int(b[::4096].sum())
    return total


def _fingerprint(tensors: dict) -> str:
    """A hash of three tensors' bytes (first, middle, last by name): contestants must agree."""
    # after main set the environment the contestants read when imported
    import torch

    names = sorted(tensors)
    h = xxhash.xxh64()
    for n in sorted({names[0], names[len(names) // 2], names[-1]}):
        t = tensors[n].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        h.update(n.encode())
        h.update(memoryview(t.numpy()))
    return h.hexdigest()


def main() -> None:
    args = json.loads(sys.argv[1])
    name, device, threads = args["contestant"], args["device"], args["threads"]
    if name == "runai":
        os.environ.setdefault("RUNAI_STREAMER_CONCURRENCY", str(max(16, threads)))
        os.environ.setdefault("RUNAI_STREAMER_MEMORY_LIMIT", "-1")
    # after main set the environment the contestants read when imported
    import torch

    # import the contestant's library before the clock starts
    mod = {"zerostart": "zerostart.weights", "zerostart-reserved": "zerostart.weights",
           "safetensors": "safetensors.torch", "safe_open": "safetensors",
           "runai": "runai_model_streamer", "fastsafetensors": "fastsafetensors", "tensorizer": "tensorizer",
           "zerostart-nocache": "zerostart.weights", "download": "boto3"}[name]
    __import__(mod)
    if mod == "zerostart.weights":
        from zerostart.weights import load_arena  # noqa: F401  the loader itself (imported on first use)
    if name.startswith("zerostart") and source_scheme(str(args["path"])) is Scheme.S3:
        for m in ("botocore.session", "botocore.auth", "botocore.awsrequest"):  # its S3 signing library
            __import__(m)
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=device)
        free_before = torch.cuda.mem_get_info()[0]
        torch.cuda.reset_peak_memory_stats()
    # The harness's own first reduction (the touch below) starts torch's thread pool: paid here,
    # before the clock, so that every contestant is timed without it.
    int(torch.zeros(2 * 4096, dtype=torch.uint8)[::4096].sum())
    rss_before = _status("VmRSS")
    if name == "zerostart-reserved":  # what a standby worker does while it waits: fault in the arena's memory

        reserve_host(arena_bytes(args["files"]))

    t0 = time.perf_counter()
    tensors, keep = _contestants.load(name, args["path"], args["files"], device, args.get("extra", {}), threads)
    _touch(tensors)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0

    result = {
        "contestant": name,
        "seconds": seconds,
        "tensors": len(tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "peak_rss_bytes": _status("VmHWM") - rss_before,
        "rss_after_bytes": _status("VmRSS") - rss_before,
        "fingerprint": _fingerprint(tensors),
    }
    if device.startswith("cuda"):
        result["device_bytes"] = free_before - torch.cuda.mem_get_info()[0]
        result["torch_peak_device_bytes"] = torch.cuda.max_memory_allocated()
    if name in ("zerostart", "zerostart-reserved"):
        result["stats"] = keep.stats.to_dict()
    del keep
    print(json.dumps(result))


if __name__ == "__main__":
    main()
