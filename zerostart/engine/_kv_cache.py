"""The KV cache: one allocation of per-sequence slots, and the blocks that back them.

Layout: ``[slots, layers, 2 (k, v), kv_heads, positions, head_dim]``. A running sequence owns
one slot, a contiguous virtual range of ``max_len`` positions, so the keys of a batch of slots
``[0, n)`` up to position ``L`` are a strided view that SDPA reads directly (no gather, no
block table). What a sequence *holds* is counted in blocks of ``block_tokens`` positions: the
scheduler admits a sequence when the blocks of its prompt are free, takes one more as it grows
past a block, and gives them all back when it ends (or is preempted).

Where memory can be committed page by page (``paged``: CPU), slots are only virtual: the
cache is an anonymous mapping that takes pages as sequences write into them (a block is whole
pages of every layer's and head's row), and a slot given back returns its pages to the kernel
(``MADV_DONTNEED``), so the memory held is the blocks held and the budget bounds blocks, not
slots: with all defaults 32 short sequences run together instead of the 5 whose full context
fitted. Pages never written read as zeros, so positions attention masks out are finite.
Elsewhere (CUDA) every slot is backed in full, allocated and zeroed once, and the budget
bounds slots as before; blocks are then counted within each slot.

Position ``max_len`` of slot 0 is scratch: the filler rows of a decode batch write there, and
nothing reads it.
"""

from __future__ import annotations

import math
import mmap
import sys
from dataclasses import dataclass

import torch

from zerostart.engine._config import ModelShape
from zerostart.engine._errors import EngineError

_PAGED = sys.platform.startswith("linux")  # anonymous mappings, MAP_NORESERVE, MADV_DONTNEED zero-fills
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python's mmap does not name it
_MIN_BLOCK = 16  # tokens: fewer makes the per-block bookkeeping the cost


def bytes_per_token(cfg: ModelShape, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class KVPlan:
    """How a budget becomes a cache: its slots and its blocks."""

    slots: int  # sequences that may hold a slot at once
    block_tokens: int
    blocks: int  # the capacity: blocks the budget (or the slots' memory) holds
    positions: int  # per slot: max_len, the scratch position, rounded up to whole blocks
    paged: bool  # slots are virtual; memory is committed as blocks are written

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_tokens


@dataclass(frozen=True)
class KVStats:
    """What ``Engine.kv_stats()`` reports: the capacity and what of it is free."""

    tokens: int  # positions the blocks hold (blocks x block_tokens): the capacity
    block_tokens: int
    blocks: int
    free_blocks: int
    slots: int  # sequences that may run at once
    nbytes: int  # bytes of the blocks
    paged: bool  # memory is taken block by block (else every slot is backed in full)
    dtype: str  # of the keys and values held ("bfloat16", ...)
    preemptions: int  # running sequences that gave their blocks back so far (prefilled again later)


def _paged(device: torch.device) -> bool:
    return _PAGED and device.type == "cpu"


def _block_tokens(cfg: ModelShape, dtype: torch.dtype, device: torch.device) -> int:
    if not _paged(device):
        return _MIN_BLOCK
    # a block is whole pages of each (slot, layer, k/v, head) row
    unit = mmap.PAGESIZE // math.gcd(mmap.PAGESIZE, cfg.head_dim * torch.empty(0, dtype=dtype).element_size())
    return unit * -(-_MIN_BLOCK // unit)


def slot_bytes(cfg: ModelShape, dtype: torch.dtype, max_len: int, device: torch.device) -> int:
    """Bytes of one slot: ``max_len`` positions and the scratch one, in whole blocks."""
    bt = _block_tokens(cfg, dtype, device)
    return -(-(max_len + 1) // bt) * bt * bytes_per_token(cfg, dtype)


def plan(cfg: ModelShape, dtype: torch.dtype, max_len: int, max_num_seqs: int, budget: int,
         device: torch.device) -> KVPlan:
    """The cache a budget buys; an error if it does not hold one sequence of ``max_len``."""
    paged = _paged(device)
    bt = _block_tokens(cfg, dtype, device)
    positions = -(-(max_len + 1) // bt) * bt
    block_bytes = bt * bytes_per_token(cfg, dtype)
    need = -(-max_len // bt)  # blocks of one sequence of max_len
    if paged:
        slots = max_num_seqs
        blocks = min(budget // block_bytes, slots * (positions // bt))
    else:
        slots = min(max_num_seqs, budget // (block_bytes * (positions // bt)))
        blocks = slots * (positions // bt)
    if blocks < need or slots < 1:
        raise EngineError(f"the KV cache budget of {budget / 2**20:.1f} MiB holds no sequence of max_model_len "
                          f"{max_len} (one needs {need * block_bytes / 2**20:.1f} MiB); raise "
                          "EngineConfig.kv_cache_bytes or lower max_model_len")
    return KVPlan(int(slots), bt, int(blocks), positions, paged)


class KVCache:
    def __init__(self, cfg: ModelShape, kv_plan: KVPlan, max_len: int, dtype: torch.dtype,
                 device: torch.device, allocator=None) -> None:
        """``allocator(nbytes, device)``, if given, provides the memory of a cache that is not
        paged (a 1-D uint8 tensor), e.g. one that parking can release and restore at the same
        address."""
        self.plan = kv_plan
        self.num_slots, self.max_len, self.block_tokens = kv_plan.slots, max_len, kv_plan.block_tokens
        self.paged = kv_plan.paged
        shape = (kv_plan.slots, cfg.num_layers, 2, cfg.num_kv_heads, kv_plan.positions, cfg.head_dim)
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        self._map: mmap.mmap | None = None
        try:
            if self.paged:
                # reserved, not committed: pages come as they are written (no huge pages, which
                # would commit 2 MiB at the first write of a block)
                self._map = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
                if hasattr(mmap, "MADV_NOHUGEPAGE"):
                    self._map.madvise(mmap.MADV_NOHUGEPAGE)
                raw = torch.frombuffer(self._map, dtype=torch.uint8)
            elif allocator is None:
                raw = torch.empty(n, dtype=torch.uint8, device=device)
            else:
                raw = allocator(n, device)
        except (torch.OutOfMemoryError, OSError) as e:
            raise EngineError(f"KV cache of {kv_plan.slots} slots x {max_len} tokens ({n / 2**20:.0f} MiB) does not "
                              f"fit on {device} ({e}); lower EngineConfig.kv_cache_bytes, max_num_seqs or "
                              "max_model_len") from None
        self.raw = raw  # the allocation (parking releases and restores it)
        self.storage = raw[:n].view(dtype).view(shape)
        if not self.paged:
            self.storage.zero_()  # masked positions enter attention as 0 * value: never NaN
        self.k = [self.storage[:, i, 0] for i in range(cfg.num_layers)]  # [slots, kv_heads, positions, head_dim]
        self.v = [self.storage[:, i, 1] for i in range(cfg.num_layers)]
        self._slot_bytes = n // kv_plan.slots
        self._held = [0] * kv_plan.slots  # blocks each slot holds
        self.free_blocks = kv_plan.blocks

    @property
    def num_blocks(self) -> int:
        return self.plan.blocks

    @property
    def nbytes(self) -> int:
        """Bytes the cache may hold: its blocks (a paged cache's mapping is larger, and virtual)."""
        return self.plan.blocks * self.block_tokens * self.storage[0, :, :, :, 0].numel() * self.storage.element_size()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def held(self, slot: int) -> int:
        return self._held[slot]

    def reserve(self, slot: int, tokens: int) -> bool:
        """Hold blocks for positions [0, tokens) of ``slot``; False (nothing taken) if not
        enough are free."""
        more = self.blocks_for(tokens) - self._held[slot]
        if more <= 0:
            return True
        if more > self.free_blocks:
            return False
        self.free_blocks -= more
        self._held[slot] += more
        return True

    def release(self, slot: int) -> None:
        """Give back every block of ``slot``; a paged cache returns its pages to the kernel,
        so the slot reads as zeros again."""
        if self._held[slot] and self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED, slot * self._slot_bytes, self._slot_bytes)
        self.free_blocks += self._held[slot]
        self._held[slot] = 0

    def reset(self) -> None:
        """Every block free, the memory fresh (after parking dropped it); call with no
        sequence running."""
        self._held = [0] * self.num_slots
        self.free_blocks = self.plan.blocks
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)
        else:
            self.storage.zero_()
