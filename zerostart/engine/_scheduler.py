"""Which sequences run in the next step (continuous batching at step granularity).

Every step, in this order:

1. every sequence past its prompt decodes one token, and holds the KV blocks for it: one that
   grows past its last block takes a free one; when none is free, the sequence admitted last
   is preempted (its slot and blocks given back, its tokens kept: it prefills them again when
   it returns, before anyone new is admitted);
2. waiting sequences take free slots (lowest first, keeping batches dense) while the blocks
   of their prompts are free, keeping a small reserve for the running ones to grow into;
3. sequences still in their prompt share a budget of ``prefill_chunk`` prompt tokens: the
   shortest rest first, so a short prompt's first token never waits for a long prompt to be
   prefilled, while the oldest prompt always gets at least half the budget, so a stream of
   short prompts cannot starve it.

Sequences join and leave between any two steps; a long prompt takes several steps while
decodes keep flowing.

Admission is fair between client requests (a sequence's ``group``): a free slot goes to the
oldest waiting sequence of the group with the fewest running sequences, so a request of 128
sequences shares the slots with one that arrives after it instead of holding them all until
its last sequence is done.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, deque
from typing import TYPE_CHECKING

from zerostart.engine._sequence import Sequence, Status

if TYPE_CHECKING:
    from zerostart.engine._kv_cache import KVCache


class Scheduler:
    def __init__(self, num_slots: int, prefill_chunk: int, kv: KVCache | None = None) -> None:
        """``kv``: the cache whose blocks bound admission and growth (None: slots alone do)."""
        self.prefill_chunk = prefill_chunk
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.preemptions = 0
        self._free = list(range(num_slots))
        heapq.heapify(self._free)
        # blocks kept free at admission, so running sequences can grow a while before preempting
        self._reserve = max(1, kv.num_blocks // 100) if kv is not None else 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """(sequences decoding one token, (sequence, prompt tokens to prefill now))."""
        decode = self._grow()
        admitted = []
        for seq in self._candidates(len(self._free)):
            if not self._fits(seq):  # nobody overtakes a prompt that waits for blocks
                break
            seq.slot = heapq.heappop(self._free)
            if self.kv is not None:
                self.kv.reserve(seq.slot, seq.prefill_len + 1)
            seq.status = Status.RUNNING
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            self.running.append(seq)
            admitted.append(seq)
        if admitted:
            taken = set(map(id, admitted))
            self.waiting = deque(s for s in self.waiting if id(s) not in taken)
        return decode, self._prefills()

    def _grow(self) -> list[Sequence]:
        """The decoding sequences, each holding the block its next token's keys go to; the
        newest running sequences are preempted while blocks are short."""
        decode = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.in_prefill:
                continue  # preempted in this loop, or still prefilling
            while self.kv is not None and not self.kv.reserve(seq.slot, seq.num_cached + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                decode.append(seq)
        return decode

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.give_slot(seq.slot)
        seq.status = Status.WAITING
        seq.preempt()
        self.waiting.appendleft(seq)  # victims are taken newest first: the oldest ends up in front
        self.preemptions += 1

    def _fits(self, seq: Sequence) -> bool:
        if self.kv is None:
            return True
        reserve = self._reserve if self.running else 0  # alone, a sequence may use every block
        return self.kv.blocks_for(seq.prefill_len + 1) <= self.kv.free_blocks - reserve

    def _prefills(self) -> list[tuple[Sequence, int]]:
        """Split the prefill budget: half of it at least to the oldest prompt, the rest to the
        shortest rests first."""
        prefilling = [s for s in self.running if s.in_prefill]
        if not prefilling:
            return []
        rest = {s: s.prefill_len - s.num_cached for s in prefilling}
        oldest = prefilling[0]
        plan = {oldest: min(rest[oldest], self.prefill_chunk // 2)}
        budget = self.prefill_chunk - plan[oldest]
        for s in sorted(prefilling, key=lambda s: rest[s]):  # stable: equal rests keep admission order
            n = min(budget, rest[s] - plan.get(s, 0))
            if n > 0:
                plan[s] = plan.get(s, 0) + n
                budget -= n
        return [(s, plan[s]) for s in prefilling if plan.get(s)]

    def _candidates(self, free: int) -> list[Sequence]:
        """Up to ``free`` waiting sequences in the order they should start: preempted ones
        first, then each the oldest of the group with the fewest running sequences (then the
        group waiting longest)."""
        if not free or not self.waiting:
            return []
        back = [s for s in self.waiting if s.preempted][:free]
        new = [s for s in self.waiting if not s.preempted]
        free -= len(back)
        if len(new) <= free:
            return back + new
        groups: dict[object, deque[Sequence]] = {}
        for seq in new:  # arrival order, per group
            groups.setdefault(seq.group, deque()).append(seq)
        running = Counter(s.group for s in [*self.running, *back])
        heap = [(running[g], order, g) for order, g in enumerate(groups)]  # order: the group's oldest arrival
        heapq.heapify(heap)
        out: list[Sequence] = []
        while len(out) < free:
            n, order, g = heapq.heappop(heap)
            out.append(groups[g].popleft())
            if groups[g]:
                heapq.heappush(heap, (n + 1, order, g))
        return back + out

    def take_slot(self, tokens: int = 0) -> int | None:
        """A free slot holding the blocks of ``tokens`` positions, for work outside the queue
        (scoring a prompt), or None when no slot or not enough blocks are free."""
        if not self._free:
            return None
        slot = self._free[0]
        if self.kv is not None and not self.kv.reserve(slot, tokens):
            return None
        return heapq.heappop(self._free)

    def give_slot(self, slot: int) -> None:
        if self.kv is not None:
            self.kv.release(slot)
        heapq.heappush(self._free, slot)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted), freeing its slot and blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.give_slot(seq.slot)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
