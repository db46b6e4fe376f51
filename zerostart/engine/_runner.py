"""Turn a scheduled step into tensors, run the model, return the logits that get sampled.

Eager steps take exact shapes. Pure decode steps on CUDA replay a CUDA graph captured for a
(batch, context) bucket: the batch is padded to the next batch-size bucket with filler rows
and the keys read up to the next context-length bucket; inputs are copied into the graph's
static buffers in one host-to-device transfer. With ``compile`` the same bucketed step is a
``torch.compile``d call (inside the graph on CUDA).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from zerostart.engine import _kernels
from zerostart.engine._config import EngineConfig
from zerostart.engine._context import Prefill, StepContext
from zerostart.engine._kv_cache import KVCache
from zerostart.engine._model import Transformer
from zerostart.engine._sequence import Sequence


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return out


@dataclass
class StepOutput:
    logits: torch.Tensor  # [N, vocab] float32: the rows to sample, one per sequence in `seqs`
    seqs: list[Sequence]
    # prompt logprobs: (sequence, first prompt position, logits [k, vocab] of positions p .. p + k - 1)
    prompt: list[tuple[Sequence, int, torch.Tensor]]
    # pooling: (sequence, final hidden states [k, hidden]: the chunk's rows for mean, the last for last)
    hidden: list[tuple[Sequence, torch.Tensor]]


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph | None"
    inputs: torch.Tensor  # [5, nb] int64: ids, positions, kv slots, kv positions, key counts
    ctx: StepContext
    logits: torch.Tensor | None


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVCache, device: torch.device, config: EngineConfig) -> None:
        self.model, self.kv, self.device = model, kv, device
        self.cuda = device.type == "cuda"
        self.use_graphs = self.cuda and config.cuda_graphs
        self.bucketed = self.use_graphs or config.compile
        self.batch_buckets = _buckets(kv.num_slots, 1)
        self.len_buckets = _buckets(kv.max_len, min(256, kv.max_len))
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None  # the CUDA graph memory pool, made at the first capture
        self._forward = model.forward
        model.use_kernels(not config.compile and _kernels.fused(device, model.norm.weight.dtype))
        if config.compile:
            # torch.compile's machinery (seconds to import) only when compile is on
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                        4 * len(self.batch_buckets) * len(self.len_buckets))
            self._forward = torch.compile(model.forward, dynamic=False)
        self.graph_capture_seconds = 0.0

    # -- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, decode: list[Sequence], prefills: list[tuple[Sequence, int]]) -> StepOutput:
        """Run one step. ``prefills`` are (sequence, tokens to prefill now). Returns the logits to
        sample (decodes, then prefills that finish and generate) and the extra rows that prompt
        logprobs and pooling asked for."""
        if decode and not prefills and self.bucketed:
            return StepOutput(self._decode_bucketed(decode), decode, [], [])
        rows: list[list[int]] = [[], [], [], []]  # ids, positions, (decode rows:) kv slots, kv positions
        lens: list[int] = []
        nd = max(s.slot for s in decode) + 1 if decode else 0
        gathered = nd > 2 * len(decode) + 2  # mostly filler rows: gather the few real ones instead
        if gathered:
            nd = len(decode)
            rows = [[s.last_token for s in decode], [s.num_cached for s in decode], [s.slot for s in decode],
                    [s.num_cached for s in decode]]
            lens = [s.num_cached + 1 for s in decode]
            out_rows = list(range(nd))
        elif nd:
            rows = self._decode_rows(decode, nd)
            lens = rows.pop()
            out_rows = [s.slot for s in decode]
        else:
            out_rows = []
        out_seqs = list(decode)
        plan: list[Prefill] = []
        prompt_rows: list[int] = []  # logits rows for prompt logprobs, after the sampled ones
        prompt: list[tuple[Sequence, int, int, int]] = []  # (seq, first position, offset, count)
        hidden_rows: list[int] = []
        hidden: list[tuple[Sequence, int, int]] = []  # (seq, offset, count)
        for seq, n in prefills:
            start = seq.num_cached
            row = len(rows[0])
            rows[0].extend(seq.tokens(start, n))
            rows[1].extend(range(start, start + n))
            plan.append(Prefill(seq.slot, start, n, row))
            last = start + n == seq.prefill_len
            if seq.resumed:  # prefilling again after a preemption: its outputs were given already
                continue
            if seq.params.prompt_logprobs is not None:
                k = min(start + n, seq.prompt_len - 1) - start  # positions whose next token is in the prompt
                if k > 0:
                    prompt.append((seq, start, len(prompt_rows), k))
                    prompt_rows.extend(range(row, row + k))
            if seq.pooling is not None:
                first = row if seq.pooling.pooling == "mean" else row + n - 1
                if seq.pooling.pooling == "mean" or last:
                    hidden.append((seq, len(hidden_rows), row + n - first))
                    hidden_rows.extend(range(first, row + n))
            elif last and seq.max_tokens > 0:
                out_rows.append(row + n - 1)
                out_seqs.append(seq)
        pad = [0] * (len(rows[0]) - nd)
        packed = self._to_device(rows[:2] + ([rows[2] + pad, rows[3] + pad, lens + pad] if nd else []))
        ns = len(out_rows)
        ctx = StepContext(input_ids=packed[0], positions=packed[1],
                          kv_slots=packed[2][:nd] if nd else None, kv_pos=packed[3][:nd] if nd else None,
                          num_decode=nd, decode_len=max(lens) if lens else 0, decode_lens=packed[4][:nd] if nd else None,
                          decode_slots=packed[2][:nd] if gathered else None,
                          prefills=plan, logits_rows=self._to_device([out_rows + prompt_rows])[0],
                          hidden_rows=self._to_device([hidden_rows])[0] if hidden_rows else None)
        logits = self.model(ctx, self.kv.k, self.kv.v)
        hid = ctx.hidden_out  # set when hidden_rows is, so whenever `hidden` is not empty
        return StepOutput(logits[:ns], out_seqs,
                          [(seq, pos, logits[ns + off : ns + off + k]) for seq, pos, off, k in prompt],
                          [(seq, hid[off : off + k]) for seq, off, k in hidden] if hid is not None else [])

    @torch.inference_mode()
    def prefill_logits(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Write ``ids`` at positions [start, start + len) of ``slot``; logits of every row."""
        n = len(ids)
        packed = self._to_device([ids, list(range(start, start + n))])
        ctx = StepContext(input_ids=packed[0], positions=packed[1], prefills=[Prefill(slot, start, n, 0)])
        return self.model(ctx, self.kv.k, self.kv.v)

    def _decode_rows(self, decode: list[Sequence], n: int) -> list[list[int]]:
        """Rows [0, n) for slots [0, n): ids, positions, kv slots, kv positions, key counts;
        filler rows (slots with no decoding sequence) write to the scratch position."""
        scratch = self.kv.max_len
        ids, pos, slots, kvpos, lens = [0] * n, [0] * n, [0] * n, [scratch] * n, [1] * n
        for s in decode:
            ids[s.slot] = s.last_token
            slots[s.slot] = s.slot
            pos[s.slot] = kvpos[s.slot] = s.num_cached
            lens[s.slot] = s.num_cached + 1
        return [ids, pos, slots, kvpos, lens]

    def _to_device(self, rows: list[list[int]]) -> torch.Tensor:
        t = torch.tensor(rows, dtype=torch.int64)
        if self.cuda:
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t

    # -- bucketed decode (CUDA graphs / torch.compile) ----------------------------------------

    def _decode_bucketed(self, decode: list[Sequence]) -> torch.Tensor:
        nd = max(s.slot for s in decode) + 1
        nb = next(b for b in self.batch_buckets if b >= nd)
        rows = self._decode_rows(decode, nb)
        lb = next(b for b in self.len_buckets if b >= max(rows[-1]))
        g = self._graphs.get((nb, lb)) or self._capture(nb, lb)
        host = torch.tensor(rows, dtype=torch.int64)
        g.inputs.copy_(host.pin_memory() if self.cuda else host, non_blocking=self.cuda)
        if g.graph is not None:
            g.graph.replay()
            assert g.logits is not None  # a captured graph's static output
            logits = g.logits
        else:
            logits = self._forward(g.ctx, self.kv.k, self.kv.v)
        return logits[[s.slot for s in decode]]

    def _capture(self, nb: int, lb: int) -> _Graph:
        t0 = time.perf_counter()
        inputs = torch.zeros(5, nb, dtype=torch.int64, device=self.device)
        inputs[3].fill_(self.kv.max_len)  # filler rows write to scratch
        inputs[4].fill_(1)
        ctx = StepContext(input_ids=inputs[0], positions=inputs[1], kv_slots=inputs[2], kv_pos=inputs[3],
                          num_decode=nb, decode_len=lb, decode_lens=inputs[4])
        if not self.use_graphs:
            g = _Graph(None, inputs, ctx, None)
        else:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up (and compile) outside the capture
                    self._forward(ctx, self.kv.k, self.kv.v)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(ctx, self.kv.k, self.kv.v)
            g = _Graph(graph, inputs, ctx, logits)
        self._graphs[(nb, lb)] = g
        self.graph_capture_seconds += time.perf_counter() - t0
        return g

    def capture_all(self, max_len: int | None = None) -> int:
        """Capture (or compile) every batch bucket for context buckets up to ``max_len``."""
        if not self.bucketed:
            return 0
        limit = max_len or self.kv.max_len
        n = 0
        for lb in self.len_buckets:
            for nb in self.batch_buckets:
                if (nb, lb) not in self._graphs:
                    self._capture(nb, lb)
                    n += 1
            if lb >= limit:
                break
        return n
