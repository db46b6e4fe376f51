"""Which sequences run in the next step (continuous batching at step granularity).

Every step: waiting sequences take free KV slots (lowest slot first, so a batch's slots stay
dense), every sequence past its prompt decodes one token, and sequences still in their prompt
share a budget of ``prefill_chunk`` prompt tokens, oldest first. Sequences join and leave
between any two steps; a long prompt takes several steps while decodes keep flowing.

Admission is fair between client requests (a sequence's ``group``): a free slot goes to the
oldest waiting sequence of the group with the fewest running sequences, so a request of 128
sequences shares the slots with one that arrives after it instead of holding them all until
its last sequence is done.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, deque

from zerostart.engine._sequence import Sequence, Status


class Scheduler:
    def __init__(self, num_slots: int, prefill_chunk: int) -> None:
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """(sequences decoding one token, (sequence, prompt tokens to prefill now))."""
        for seq in self._admissions(len(self._free)):
            seq.slot = heapq.heappop(self._free)
            seq.status = Status.RUNNING
            seq.scheduled_at = time.monotonic()
            self.running.append(seq)
        decode = [s for s in self.running if not s.in_prefill]
        prefills: list[tuple[Sequence, int]] = []
        budget = self.prefill_chunk
        for s in self.running:
            if budget <= 0:
                break
            if s.in_prefill:
                n = min(budget, s.prompt_len - s.num_cached)
                prefills.append((s, n))
                budget -= n
        return decode, prefills

    def _admissions(self, free: int) -> list[Sequence]:
        """Up to ``free`` waiting sequences, taken out of ``waiting``: each the oldest of the
        group with the fewest running sequences (then the group waiting longest)."""
        if not free or not self.waiting:
            return []
        if len(self.waiting) <= free:
            out = list(self.waiting)
            self.waiting.clear()
            return out
        groups: dict[object, deque[Sequence]] = {}
        for seq in self.waiting:  # arrival order, per group
            groups.setdefault(seq.group, deque()).append(seq)
        running = Counter(s.group for s in self.running)
        heap = [(running[g], order, g) for order, g in enumerate(groups)]  # order: the group's oldest arrival
        heapq.heapify(heap)
        out = []
        while len(out) < free:
            n, order, g = heapq.heappop(heap)
            out.append(groups[g].popleft())
            if groups[g]:
                heapq.heappush(heap, (n + 1, order, g))
        taken = set(map(id, out))
        self.waiting = deque(s for s in self.waiting if id(s) not in taken)
        return out

    def take_slot(self) -> int | None:
        """A free slot for work outside the queue (scoring a prompt), or None."""
        return heapq.heappop(self._free) if self._free else None

    def give_slot(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted), freeing its slot."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            heapq.heappush(self._free, seq.slot)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
