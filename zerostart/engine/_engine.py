"""The engine: load a model, then turn requests into streams of tokens.

    engine = Engine.from_pretrained("path/to/model", device="cuda")
    for ev in engine.generate("Hello", SamplingParams(max_tokens=32, temperature=0)):
        print(ev.text, end="")

Serving: ``start()`` runs the step loop on a background thread; ``submit()`` (thread-safe)
returns a :class:`RequestHandle` at once. Without ``start()``, ``generate()`` drives the steps
on the calling thread.
"""

from __future__ import annotations

import time

_IMPORT_START = time.perf_counter()

import logging  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
from collections import deque  # noqa: E402
from typing import Iterator  # noqa: E402

import torch  # noqa: E402

from zerostart import weights  # noqa: E402
from zerostart.engine import _load, _weights  # noqa: E402
from zerostart.engine._config import EngineConfig, ModelShape  # noqa: E402
from zerostart.engine._detok import Detokenizer  # noqa: E402
from zerostart.engine._errors import EngineError  # noqa: E402
from zerostart.engine._grammar import GrammarEngine  # noqa: E402
from zerostart.engine._kv_cache import KVCache, KVStats, plan as kv_plan  # noqa: E402
from zerostart.engine._model import Transformer  # noqa: E402
from zerostart.engine._logprobs import logprobs as _logprobs, row_logprobs  # noqa: E402
from zerostart.engine._params import PoolingParams, SamplingParams, TokenEvent  # noqa: E402
from zerostart.engine._runner import ModelRunner, StepOutput  # noqa: E402
from zerostart.engine._sampler import Sampler  # noqa: E402
from zerostart.engine._scheduler import Scheduler  # noqa: E402
from zerostart.engine._sequence import RequestHandle, Sequence, Status  # noqa: E402
from zerostart.engine._tokenizer import Tokenizer  # noqa: E402
from zerostart.engine._weights import FusePlan  # noqa: E402
from zerostart.telemetry import Timeline  # noqa: E402

_IMPORT_END = time.perf_counter()
log = logging.getLogger("zerostart.engine")


class _BatchFailed(Exception):
    """A step's batch failed and its requests were answered; ``__cause__`` is the error."""


class Engine:
    """A loaded model with its tokenizer, KV cache and step loop. Build with :meth:`from_pretrained`."""

    def __init__(self, *, model: Transformer, model_config: ModelShape, tokenizer: Tokenizer, arena,
                 kv: KVCache, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, eos_ids: frozenset[int], model_name: str, timeline: Timeline,
                 fusion: FusePlan | None = None, source: str = "", model_dir: str = "") -> None:
        self.model = model
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.arena = arena
        self.kv = kv
        self.config = config
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_ids
        self.model_name = model_name
        self.timeline = timeline
        self.fusion = fusion  # how q/k/v and gate/up were fused (a ready image records it)
        self.source = source  # what the model was loaded from, as named
        self.model_dir = model_dir  # the local directory with its config and tokenizer files
        self.runner = ModelRunner(model, kv, device, config)
        assert config.prefill_chunk is not None, "from_pretrained fills in the device's defaults"
        self.scheduler = Scheduler(kv.num_slots, config.prefill_chunk, kv)
        self.sampler = Sampler(model_config.vocab_size, device, config.seed)
        self._inbox: deque[Sequence] = deque()
        self._grammar_lock = threading.Lock()
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # steps run (or failed): a liveness probe watches it move while there is work

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, config: EngineConfig | None = None,
                        timeline: Timeline | None = None, allocator=None) -> "Engine":
        """Load a model: a Hugging Face model directory (config.json, safetensors,
        tokenizer.json), a GGUF file, a ready image written by ``zerostart snapshot``, or a
        source the weights package resolves (``hf://org/name``, ``s3://bucket/prefix``, ``https://...``).

        ``dtype`` None picks the device's default (``zerostart.names.default_dtype``); an image
        brings its own. The load is recorded in ``engine.timeline`` (import, device_init, read,
        copy, prepare, warmup); pass ``timeline`` to record into your own.
        ``allocator(nbytes, device)`` provides the weights arena and the KV cache on CUDA (e.g.
        memory that parking can release and restore at the same addresses).

        With ``config.overlap_load`` (the default) the weights keep arriving while the model is
        assembled and warmed up: each stage of the first forward pass waits only for its own
        layer's tensors, so the warm-up's prefill overlaps the tail of the load.
        """
        source = os.fspath(path)
        config = config or EngineConfig()
        if not isinstance(config, EngineConfig):
            raise EngineError(f"config must be an EngineConfig (got {type(config).__name__})")
        timeline = _load.timeline_for(timeline, source, _IMPORT_START, _IMPORT_END)
        files = _load.model_files(source)
        with timeline.phase("device_init"):
            dev = _load.device_for(device)
            _load.set_threads(config, dev)
        config = config.for_device(dev.type)
        dtype = _load.model_dtype(dtype, dev, files, config.quantize)
        tokenizer = Tokenizer(files.dir)
        t_load = time.perf_counter()
        try:
            # an image holds its tensors as the engine does (quantized ones' scales too): no cast
            arena = weights.load_arena(files.weights, str(dev), dtype=None if files.image else dtype,
                                       background=config.overlap_load, allocator=allocator if dev.type == "cuda" else None,
                                       keep_quantized=config.quantize != "none")
            with timeline.phase("prepare") as ph:
                built = _weights.assemble(files.config, arena, config, dtype, dev, source,
                                          allocator if dev.type == "cuda" else None)
                arena = built.arena
                ph.bytes = built.plan.regrouped_bytes
                ph.detail.update(fusion="; ".join(built.plan.notes), overlap_load=built.overlap)
            with timeline.phase("warmup") as ph:
                kv_dtype = _load.kv_dtype(built.model, dtype, dev, config.kv_dtype)
                budget = _load.kv_budget(config, dev, files.config, kv_dtype, built.max_len)
                plan = kv_plan(files.config, kv_dtype, built.max_len, config.max_num_seqs, budget, dev)
                kv = KVCache(files.config, plan, built.max_len, kv_dtype, dev,
                             allocator=allocator if dev.type == "cuda" else None)
                engine = cls(model=built.model, model_config=files.config, tokenizer=tokenizer, arena=arena, kv=kv,
                             config=config, device=dev, dtype=dtype, max_model_len=built.max_len,
                             eos_ids=_load.eos_ids(files.dir, files.config, tokenizer), model_name=files.name,
                             timeline=timeline, fusion=built.plan, source=source, model_dir=files.dir)
                shared = _load.warm_up(engine)
                ph.bytes = kv.nbytes
                ph.detail.update(kv_slots=plan.slots, kv_blocks=plan.blocks, kv_block_tokens=plan.block_tokens,
                                 kv_dtype=str(kv_dtype).removeprefix("torch."),
                                 max_model_len=built.max_len, graphs=len(engine.runner._graphs),
                                 threads=torch.get_num_threads())
                if shared is not None:
                    ph.detail["threads_while_loading"] = shared
        except (weights.WeightsError, weights.SourceError) as e:  # also those surfaced while waiting on the load
            raise EngineError(str(e)) from None
        _load.record_load(timeline, arena.stats, t_load)
        log.info("loaded %s on %s (%s): %s", files.name, dev, dtype, "; ".join(built.plan.notes))
        return engine

    # -- memory, as single allocations -------------------------------------------------------

    @property
    def weights_storage(self) -> torch.Tensor:
        """The weights: the arena's one allocation (fused projections are views or regrouped in it)."""
        return self.arena.storage

    @property
    def kv_storage(self) -> torch.Tensor:
        """The KV cache: one allocation [slots, layers, 2, kv_heads, positions, head_dim] (on CPU
        a reserved mapping that takes memory block by block as sequences grow)."""
        return self.kv.storage

    @property
    def num_slots(self) -> int:
        return self.kv.num_slots

    def stats(self) -> dict[str, int]:
        """A snapshot for metrics: requests running (holding a slot) and waiting, and slots."""
        with self._cv:
            queued = len(self._inbox)
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting) + queued,
                "slots": self.kv.num_slots}

    def kv_stats(self) -> KVStats:
        """The KV cache's capacity and use: blocks of ``block_tokens`` positions, free and held."""
        kv = self.kv
        return KVStats(tokens=kv.num_blocks * kv.block_tokens, block_tokens=kv.block_tokens, blocks=kv.num_blocks,
                       free_blocks=kv.free_blocks, slots=kv.num_slots, nbytes=kv.nbytes, paged=kv.paged,
                       dtype=str(kv.storage.dtype).removeprefix("torch."), preemptions=self.scheduler.preemptions)

    # -- requests ---------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams | PoolingParams | None = None, *,
               group: object = None) -> RequestHandle:
        """Queue a request (thread-safe, returns at once). Iterate the handle for its events.

        With :class:`PoolingParams` the request is an embedding: the prompt is prefilled (batched
        with everything else) and its one event carries ``embedding``. A ``constraint`` is
        compiled here, so a grammar that cannot be used raises :class:`EngineError` at once.

        ``group``: sequences of one client request (its prompts and ``n`` choices) share a
        group; free KV slots go to the group with the fewest running sequences first, so one
        request of many sequences cannot hold every slot while others wait (None: its own group)."""
        params = params or SamplingParams()
        pooling = params if isinstance(params, PoolingParams) else None
        if pooling is not None:
            params = SamplingParams(max_tokens=0)
        if not isinstance(params, SamplingParams):
            raise EngineError(f"params must be SamplingParams or PoolingParams (got {type(params).__name__})")
        ids = self._check_prompt(prompt_ids, generate=pooling is None and params.max_tokens > 0)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        seq = Sequence(ids, params, Detokenizer(self.tokenizer, params.stop, params.skip_special_tokens),
                       max_tokens, stop_ids, pooling, group)
        if params.constraint is not None:
            seq.matcher = self.grammar().matcher(params.constraint)
        seq.handle.on_cancel = self._notify
        with self._cv:
            if self._stopping:
                raise EngineError("the engine is stopping; no new requests")
            self._inbox.append(seq)
            self._cv.notify_all()
        return seq.handle

    def grammar(self):
        """The grammar engine (llguidance over this tokenizer), made on first use."""
        with self._grammar_lock:
            if self.sampler.grammar is None:
                self.sampler.grammar = GrammarEngine(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
            return self.sampler.grammar

    def _check_prompt(self, prompt_ids: list[int], generate: bool = True) -> list[int]:
        if isinstance(prompt_ids, str):
            raise EngineError("submit() takes token ids; use engine.tokenizer.encode(text) or generate(text)")
        try:
            ids = [int(i) for i in prompt_ids]
        except (TypeError, ValueError):
            raise EngineError("prompt_ids must be a list of integers") from None
        if not ids:
            raise EngineError("the prompt is empty; it needs at least one token")
        vocab = self.model_config.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise EngineError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) > self.max_model_len or (generate and len(ids) == self.max_model_len):
            raise EngineError(f"the prompt has {len(ids)} tokens; the context is {self.max_model_len} tokens "
                              "(max_model_len), which must leave room for at least one generated token")
        return ids

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Stream the events of one request (text is encoded with the tokenizer's special tokens)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        handle = self.submit(ids, params)
        if self._thread is not None:
            yield from handle
            return
        try:
            while True:
                ev = handle.get(timeout=0)
                if ev is not None:
                    yield ev
                    if ev.finish_reason is not None:
                        return
                    continue
                if handle.finished:
                    return
                self.step()
        finally:
            if not handle.finished:
                handle.cancel()
                if self._thread is None:
                    self.step()

    def logits(self, prompt_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """Next-token logits [len(prompt_ids), vocab] (float32) at every position of a prompt,
        prefilled in chunks of ``chunk`` tokens (default: the engine's prefill chunk)."""
        ids = self._check_prompt(prompt_ids)
        chunk = chunk or self.scheduler.prefill_chunk
        with self._step_lock:
            slot = self.scheduler.take_slot(len(ids))
            if slot is None:
                raise EngineError("every KV cache slot is busy, or the free blocks do not hold the prompt; score the "
                                  "prompt when a request finishes")
            try:
                parts = [self.runner.prefill_logits(slot, ids[i : i + chunk], i) for i in range(0, len(ids), chunk)]
            finally:
                self.scheduler.give_slot(slot)
        return torch.cat(parts)

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run the step loop on a background thread (idempotent)."""
        with self._cv:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="zerostart-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop; requests still in flight end with finish_reason "abort"."""
        with self._cv:
            thread, self._stopping = self._thread, True
            self._cv.notify_all()
        if thread is not None:
            thread.join()
        with self._step_lock:
            self._abort_all()
        with self._cv:
            self._thread = None
            self._stopping = False

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._inbox and not self.scheduler.has_work:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # step() already handed the error to every stream
                log.exception("engine step failed")

    def step(self) -> bool:
        """Run one step (admit, schedule, forward, sample, emit). False if there was nothing to do.

        Nothing is lost when something fails: a request whose own setup or output fails ends
        with that error alone; a failed forward pass or sampling ends the requests of that batch
        (raised from their handles' iterators) and the exception propagates; anything else
        ends every request in flight. The engine stays usable."""
        with self._step_lock:
            self.steps += 1
            try:
                return self._step()
            except _BatchFailed as e:
                assert e.__cause__ is not None  # always raised from the batch's error
                raise e.__cause__ from None
            except Exception as e:
                self._fail_all(EngineError(f"engine step failed: {type(e).__name__}: {e}"))
                raise

    def _admit(self) -> None:
        # Device state of new requests is made here, on the stepping thread: other threads must
        # not touch the device while a CUDA graph may be capturing.
        with self._cv:
            new = list(self._inbox)
            self._inbox.clear()
        for seq in new:
            try:
                if seq.params.penalized:
                    seq.counts = torch.zeros(self.model_config.vocab_size, dtype=torch.float32, device=self.device)
                if seq.params.repetition_penalty != 1:
                    seq.prompt_seen = torch.zeros(self.model_config.vocab_size, dtype=torch.bool, device=self.device)
                    seq.prompt_seen[torch.tensor(seq.prompt_ids, device=self.device)] = True
                if seq.params.prompt_logprobs is not None:
                    seq.prompt_logprobs = [None]
                if seq.params.seed is not None:
                    seq.generator = torch.Generator(device=self.device)
                    seq.generator.manual_seed(seq.params.seed)
            except Exception as e:  # noqa: BLE001 - this request cannot start; the others can
                seq.status = Status.FINISHED  # never scheduled: it holds no slot
                seq.handle._fail(EngineError(f"request {seq.id} could not start: {type(e).__name__}: {e}"))
                continue
            self.scheduler.add(seq)

    def _step(self) -> bool:
        self._admit()
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if seq.handle.cancelled:
                self._finish(seq, None, "", "abort")
        decode, prefills = self.scheduler.schedule()
        if not decode and not prefills:
            return False
        batch = [*decode, *(s for s, _ in prefills)]
        try:
            out = self.runner.step(decode, prefills)
            for s in decode:
                s.num_cached += 1
            for s, n in prefills:
                s.num_cached += n
        except Exception as e:
            self._fail(batch, EngineError(f"engine step failed: {type(e).__name__}: {e}"))
            raise _BatchFailed() from e
        for seq in batch:  # a prompt's own outputs (its logprobs, an embedding) fail it alone
            try:
                self._prompt_outputs(out, seq)
            except Exception as e:  # noqa: BLE001
                self._fail([seq], EngineError(f"request {seq.id} failed: {type(e).__name__}: {e}"))
        for seq, _ in prefills:  # prompts that end here without generating (scoring, embeddings)
            if seq.handle.finished:
                continue
            if not seq.in_prefill and (seq.pooling is not None or seq.max_tokens == 0):
                self._finish_prompt_only(seq)
        live = [(i, seq) for i, seq in enumerate(out.seqs) if not seq.handle.finished]
        if not live:
            return True
        try:
            tokens = self.sampler(out.logits, out.seqs)
            lps = row_logprobs(out.logits, tokens, [s.params.logprobs for s in out.seqs])
        except Exception as e:
            self._fail([seq for _, seq in live], EngineError(f"engine step failed: {type(e).__name__}: {e}"))
            raise _BatchFailed() from e
        for i, seq in live:
            try:
                self._emit(seq, tokens[i], lps[i])
            except Exception as e:  # noqa: BLE001 - e.g. a detokenizer error: this request alone ends
                self._fail([seq], EngineError(f"request {seq.id} failed: {type(e).__name__}: {e}"))
        return True

    def _prompt_outputs(self, out: StepOutput, seq: Sequence) -> None:
        """``seq``'s part of a step's prompt outputs: its prompt logprobs, an embedding's pooling."""
        for s, pos, logits in out.prompt:
            if s is not seq:
                continue
            k = seq.params.prompt_logprobs or 0
            assert seq.prompt_logprobs is not None
            seq.prompt_logprobs.extend(_logprobs(logits, seq.prompt_ids[pos + 1 : pos + 1 + logits.shape[0]], k))
        for s, hidden in out.hidden:
            if s is not seq:
                continue
            assert seq.pooling is not None
            if seq.pooling.pooling == "mean":
                part = hidden.sum(dim=0)
                seq.pooled = part if seq.pooled is None else seq.pooled + part
            else:
                seq.pooled = hidden[-1]

    def _finish_prompt_only(self, seq: Sequence) -> None:
        embedding = None
        if seq.pooling is not None:
            v = seq.pooled / seq.prompt_len if seq.pooling.pooling == "mean" else seq.pooled
            if seq.pooling.dimensions is not None:
                v = v[: seq.pooling.dimensions]
            if seq.pooling.normalize:
                v = torch.nn.functional.normalize(v, dim=0)
            embedding = v.tolist()
        self.scheduler.remove(seq)
        seq.handle._push(TokenEvent(None, "", "stop" if seq.pooling is not None else "length", seq.prompt_len, 0,
                                    prompt_logprobs=seq.prompt_logprobs, embedding=embedding))

    def _emit(self, seq: Sequence, token: int, lp=None) -> None:
        seq.output_ids.append(token)
        if seq.counts is not None:
            seq.counts[token] += 1
        n = len(seq.output_ids)
        first = seq.prompt_logprobs if n == 1 else None
        held = n <= seq.params.min_tokens  # min_tokens: nothing ends the stream before this token
        if token in seq.stop_ids and not held:
            self._finish(seq, token, seq.detok.finish(), "stop", lp, first)
            return
        if seq.matcher is not None:
            try:
                seq.matcher.accept(token)
            except EngineError as e:
                self.scheduler.remove(seq)
                seq.handle._fail(e)
                return
        text = seq.detok.add(token, stop=not held)
        if seq.detok.stopped:
            self._finish(seq, token, text, "stop", lp, first)
        elif n >= seq.max_tokens:
            self._finish(seq, token, text + seq.detok.finish(), "length", lp, first)
        elif seq.matcher is not None and seq.matcher.done:
            self._finish(seq, token, text + seq.detok.finish(), "stop", lp, first)
        else:
            seq.handle._push(TokenEvent(token, text, None, seq.prompt_len, n, lp, first))

    def _finish(self, seq: Sequence, token: int | None, text: str, reason: str, lp=None, prompt_lps=None) -> None:
        self.scheduler.remove(seq)
        seq.handle._push(TokenEvent(token, text, reason, seq.prompt_len, len(seq.output_ids), lp, prompt_lps))

    def _abort_all(self) -> None:
        self._admit()
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            self._finish(seq, None, "", "abort")

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        for seq in seqs:
            self.scheduler.remove(seq)
            seq.handle._fail(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            while self._inbox:
                self.scheduler.add(self._inbox.popleft())
        self._fail([*self.scheduler.waiting, *self.scheduler.running], error)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"Engine({self.model_name!r}, device={self.device}, dtype={self.dtype}, "
                f"max_model_len={self.max_model_len}, slots={self.num_slots})")
