"""An arena's float matrices quantized at load into a new arena (``quantize: int8 | int4``).

One matrix at a time is quantized (``_quant.quantize``); the results and the tensors kept as
they were are then copied, in layer order with each fused group's parts back to back (as a
ready image lays them out), into one new allocation on the same device, and the old arena is
let go. Peak memory: the old arena plus the new one. A ready image of the result pays this
once (``images: write`` in a server's config).
"""

from __future__ import annotations

import time

import torch

from zerostart.weights._arena import Arena, LoadStats, views
from zerostart.weights._image import _fused_key, _layer_key
from zerostart.weights._io import Region, align_up
from zerostart.weights._plan import TENSOR_ALIGN, Layout, Slot
from zerostart.weights._quant import quantize


def quantize_arena(arena: Arena, plan: dict[str, int], allocator=None) -> Arena:
    """A new arena holding ``arena``'s tensors with each ``plan`` name (a float matrix
    ``<prefix>.weight``) as ``<prefix>.qweight/.scales/.mins`` of that many bits. Waits for
    ``arena``'s load first. ``allocator(nbytes, device)``: the new arena's memory on CUDA (as
    for the load, e.g. memory parking can release)."""
    arena.wait()
    t0 = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    for name, t in arena.tensors.items():
        bits = plan.get(name)
        if bits is None:
            out[name] = t
            continue
        prefix = name.removesuffix(".weight")
        for kind, part in quantize(t, bits).items():
            out[f"{prefix}.{kind}"] = part
    position = {n: i for i, n in enumerate(out)}
    order = sorted(out, key=lambda n: (_layer_key(n), _fused_key(n), position[n]))
    slots: dict[str, Slot] = {}
    cursor, previous = 0, None
    for name in order:
        t = out[name]
        rank, index = _fused_key(name)
        follows = rank and previous == (rank, index - 1)
        cursor = align_up(cursor, t.element_size() if follows else max(TENSOR_ALIGN, t.element_size()))
        slots[name] = Slot(name, cursor, t.dtype, tuple(t.shape), None, 0)
        cursor += t.numel() * t.element_size()
        previous = (rank, index)
    size = align_up(max(cursor, 1), TENSOR_ALIGN)
    dev = arena.device
    region = Region.anonymous(size) if dev.type == "cpu" else None
    if region is not None:
        storage = region.tensor()
    else:
        storage = allocator(size, dev) if allocator is not None else torch.empty(size, dtype=torch.uint8, device=dev)
    tensors = views(storage, slots)
    for name in order:
        tensors[name].copy_(out[name])
    old = arena.stats
    stats = LoadStats(**{**old.__dict__, "arena_bytes": size, "tensors": len(slots)})
    stats.strategy = {"quantize": 1}  # private memory now: the engine may rearrange it (Arena.writable)
    stats.total_s = old.total_s + (time.perf_counter() - t0)
    new = Arena(storage, tensors, Layout("quantized", size, slots, [], []), stats, region)
    new.opened = arena.opened
    new.finish(None)
    return new
