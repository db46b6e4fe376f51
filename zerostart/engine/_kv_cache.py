"""The KV cache: one allocation, sized from a byte budget, split into per-sequence slots.

Layout: ``[layers, 2 (k, v), slots, kv_heads, max_len + 1, head_dim]``. Each running sequence
owns one slot for its whole life, so the keys of a batch of slots ``[0, n)`` up to position
``L`` are a strided view (no gather) that SDPA reads directly. Position ``max_len`` of every
slot is scratch: filler rows write there and nothing reads it.

Attention masks out positions a sequence has not written, but masked values still enter the
weighted sum (as 0 * value), so they must not be NaN. Fresh memory is zeroed lazily, per slot,
just before a step first reads it: a CPU cache only takes pages as sequences grow into them.
"""

from __future__ import annotations

import torch

from zerostart.engine._config import ModelShape
from zerostart.engine._errors import EngineError


def bytes_per_token(cfg: ModelShape, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


class KVCache:
    def __init__(self, cfg: ModelShape, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, allocator=None) -> None:
        """``allocator(nbytes, device)``, if given, provides the memory (a 1-D uint8 tensor),
        e.g. one that can be released and restored at the same address for parking."""
        self.num_slots, self.max_len = num_slots, max_len
        shape = (cfg.num_layers, 2, num_slots, cfg.num_kv_heads, max_len + 1, cfg.head_dim)
        try:
            if allocator is None:
                self.storage = torch.empty(shape, dtype=dtype, device=device)
            else:
                n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
                self.raw = allocator(n, device)
                self.storage = self.raw[:n].view(dtype).view(shape)
        except torch.OutOfMemoryError:
            raise EngineError(f"KV cache of {num_slots} slots x {max_len} tokens does not fit on {device}; "
                              "lower EngineConfig.kv_cache_bytes, max_num_seqs or max_model_len") from None
        self.k = [self.storage[i, 0] for i in range(cfg.num_layers)]
        self.v = [self.storage[i, 1] for i in range(cfg.num_layers)]
        self._zeroed = [0] * num_slots  # positions [0, n) of each slot hold finite values
        if device.type != "cpu":
            self.storage.zero_()
            self._zeroed = [max_len + 1] * num_slots

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def ensure_zeroed(self, slot: int, upto: int) -> None:
        """Make positions [0, upto) of ``slot`` safe to read. Call it before a step writes or
        reads there: positions below the mark are never zeroed again."""
        done = self._zeroed[slot]
        if done < upto:
            upto = min(self.max_len + 1, max(upto, 2 * done, 64))  # grow geometrically: few calls
            self.storage[:, :, slot, :, done:upto].zero_()
            self._zeroed[slot] = upto


def plan_slots(cfg: ModelShape, dtype: torch.dtype, max_len: int, max_num_seqs: int, budget: int) -> int:
    """Slots that fit the budget, at most ``max_num_seqs``; an error if not even one does."""
    per_slot = bytes_per_token(cfg, dtype) * (max_len + 1)
    slots = min(max_num_seqs, budget // per_slot)
    if slots < 1:
        raise EngineError(f"the KV cache budget of {budget / 2**20:.1f} MiB holds no sequence of max_model_len "
                          f"{max_len} (one needs {per_slot / 2**20:.1f} MiB); raise EngineConfig.kv_cache_bytes "
                          "or lower max_model_len")
    return int(slots)
