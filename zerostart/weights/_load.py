"""Load a checkpoint into one arena (placeholder pipeline: sequential reads)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from zerostart.weights._checkpoint import resolve
from zerostart.weights._dtypes import parse_dtype, to_torch


@dataclass
class LoadConfig:
    threads: int = 0


@dataclass
class LoadStats:
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class Arena:
    storage: torch.Tensor
    tensors: dict[str, torch.Tensor]
    stats: LoadStats = field(default_factory=LoadStats)


def load_arena(path, device="cpu", *, dtype=None, config=None, progress: Callable[[int, int], None] | None = None) -> Arena:
    t0 = time.perf_counter()
    ckpt = resolve(path)
    dtype = parse_dtype(dtype)
    total = sum(h.file_size for h in ckpt.headers)
    host = torch.empty(total, dtype=torch.uint8)
    tensors: dict[str, torch.Tensor] = {}
    base = 0
    for h in ckpt.headers:
        with open(h.path, "rb", buffering=0) as f:
            f.readinto(memoryview(host.numpy())[base : base + h.file_size])
        for name, t in h.tensors.items():
            o = base + h.data_start + t.start
            td = to_torch(t.dtype, f"{h.path}: tensor {name!r}: ")
            tensors[name] = host[o : o + t.nbytes].clone().view(td).view(t.shape)
        base += h.file_size
    out = {}
    for k, v in tensors.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.to(device)
    return Arena(host, out, LoadStats(total, time.perf_counter() - t0))


def load(path, device="cpu", *, dtype=None, config=None, progress=None) -> dict[str, torch.Tensor]:
    return load_arena(path, device, dtype=dtype, config=config, progress=progress).tensors
