"""A request inside the engine (:class:`Sequence`) and the caller's end of it (:class:`RequestHandle`).

Lifecycle (the scheduler moves it; nothing else does):

    WAITING   -> RUNNING    a KV cache slot is free and the blocks of its prompt fit: both are
                            taken, prefill begins
    RUNNING   -> WAITING    preempted: a running sequence needed a block and none was free; its
                            slot and blocks are freed, it keeps its tokens and is first to come
                            back (its prompt and output are prefilled again: recompute)
    RUNNING   -> FINISHED   stop / length; or cancel() or engine stop (abort): slot and blocks freed
    WAITING   -> FINISHED   cancel() or engine stop before it ran (abort)
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import threading
import time
from collections import deque
from typing import AsyncIterator, Callable, Iterator

from typing import TYPE_CHECKING, Any

import torch

from zerostart.engine._detok import Detokenizer
from zerostart.engine._params import PoolingParams, SamplingParams, TokenEvent, TokenLogprob

if TYPE_CHECKING:
    from zerostart.engine._grammar import Matcher

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, detok: Detokenizer,
                 max_tokens: int, stop_ids: frozenset[int], pooling: PoolingParams | None = None,
                 group: object = None) -> None:
        self.id = next(_ids)
        self.group = self.id if group is None else group  # the client request it belongs to (fair admission)
        self.prompt_ids = prompt_ids
        self.params = params
        self.pooling = pooling  # an embedding request: prefill only, then the pooled hidden state
        self.detok = detok
        self.max_tokens = max_tokens  # clipped to the context left after the prompt
        self.stop_ids = stop_ids
        self.output_ids: list[int] = []
        self.status = Status.WAITING
        self.slot = -1
        self.num_cached = 0  # tokens whose keys and values are in the cache
        self.preempted = 0  # times it gave its slot back to let others grow
        self.counts: torch.Tensor | None = None  # per-token output counts, for penalties
        self.prompt_seen: torch.Tensor | None = None  # [V] bool, tokens of the prompt (repetition_penalty)
        self.generator: torch.Generator | None = None
        self.matcher: Matcher | None = None  # grammar state (SamplingParams.constraint)
        # prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it)
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.pooled: Any = None  # [hidden] float32: the last state, or the running sum for mean pooling
        self.submitted_at = time.monotonic()
        self.scheduled_at: float | None = None  # when it took a KV cache slot (WAITING -> RUNNING)
        self.handle = RequestHandle(self)

    @property
    def wants_prompt_rows(self) -> bool:
        """Every prompt row's output is needed (prompt logprobs, mean pooling), not only the last."""
        return self.params.prompt_logprobs is not None or (self.pooling is not None and self.pooling.pooling == "mean")

    @property
    def holds_stop(self) -> bool:
        """min_tokens not reached: stop tokens and stop strings do not end the stream yet."""
        return len(self.output_ids) < self.params.min_tokens

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefill_len(self) -> int:
        """Tokens to prefill before it decodes: the prompt; after a preemption, also every
        generated token but the last (which the next decode step feeds)."""
        return self.prompt_len + max(0, len(self.output_ids) - 1)

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < self.prefill_len

    @property
    def resumed(self) -> bool:
        """Prefilling again after a preemption, with tokens already generated: its prefill
        samples nothing and computes no prompt outputs (they were given already)."""
        return bool(self.output_ids)

    def tokens(self, start: int, n: int) -> list[int]:
        """Tokens at positions [start, start + n) of prompt + output."""
        if start + n <= self.prompt_len:
            return self.prompt_ids[start : start + n]
        return (self.prompt_ids + self.output_ids)[start : start + n]

    def preempt(self) -> None:
        """Its cache is gone (the scheduler freed slot and blocks): prefill again from position 0.
        Prompt outputs not yet given (prompt logprobs, a pooled state) start over too."""
        self.num_cached = 0
        self.slot = -1
        self.preempted += 1
        if not self.output_ids:
            self.pooled = None
            if self.prompt_logprobs is not None:
                self.prompt_logprobs = [None]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]


class RequestHandle:
    """The stream of one request. Iterate it (blocking) or ``async for`` over ``aiter()``;
    ``cancel()`` ends it with finish_reason "abort" at the next step. Thread-safe."""

    def __init__(self, seq: Sequence) -> None:
        self._seq = seq
        self._lock = threading.Lock()
        self._events: deque[TokenEvent] = deque()
        self._done = False  # the final event has been queued
        self._error: BaseException | None = None
        self._cond = threading.Condition(self._lock)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []  # for the next event
        self._end_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []  # for the end
        self.cancelled = False
        self.on_cancel: Callable[[], None] | None = None  # set by the engine: wakes its loop

    @property
    def request_id(self) -> int:
        return self._seq.id

    @property
    def prompt_tokens(self) -> int:
        return self._seq.prompt_len

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def queued_s(self) -> float | None:
        """Seconds it waited for a KV cache slot (None while it still waits, or if it never got one)."""
        seq = self._seq
        return None if seq.scheduled_at is None else seq.scheduled_at - seq.submitted_at

    @property
    def submitted_at(self) -> float:
        return self._seq.submitted_at

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step and the stream ends with "abort"."""
        with self._lock:
            if self._done:
                return
            self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    # -- producer side (engine thread) ------------------------------------------------------

    def _push(self, ev: TokenEvent) -> None:
        with self._lock:
            if self._done:
                return
            self._events.append(ev)
            if ev.finish_reason is not None:
                self._done = True
            self._wake()

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._done:
                return
            self._error = error
            self._done = True
            self._wake()

    def _wake(self) -> None:
        # caller holds the lock
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        if self._done:
            waiters, self._end_waiters = waiters + self._end_waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut)

    # -- consumer side ----------------------------------------------------------------------

    def _next_ready(self) -> TokenEvent | None:
        # caller holds the lock; None = nothing yet; raises StopIteration at the end
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._done:
            raise StopIteration
        return None

    def get(self, timeout: float | None = None) -> TokenEvent | None:
        """The next event, waiting up to ``timeout`` seconds (None = forever); None at the end or on timeout."""
        with self._lock:
            while True:
                try:
                    ev = self._next_ready()
                except StopIteration:
                    return None
                if ev is not None:
                    return ev
                if not self._cond.wait(timeout):
                    return None

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._lock:
                while True:
                    try:
                        ev = self._next_ready()
                    except StopIteration:
                        return
                    if ev is not None:
                        break
                    self._cond.wait()
            yield ev

    async def aiter(self) -> AsyncIterator[TokenEvent]:
        """Events as an async iterator; waits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                try:
                    ev = self._next_ready()
                except StopIteration:
                    return
                if ev is None:
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if ev is None:
                await fut
                continue
            yield ev

    async def ended(self) -> None:
        """Wait without blocking the event loop until the last event is queued (they stay queued:
        iterate the handle for them). One wake-up of the loop a request, not one an event: an
        answer that is not streamed needs nothing before the end."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._done:
                return
            fut = loop.create_future()
            self._end_waiters.append((loop, fut))
        await fut

    def text(self) -> str:
        """Consume the stream and return the whole completion text."""
        return "".join(ev.text for ev in self)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
