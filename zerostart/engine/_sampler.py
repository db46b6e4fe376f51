"""Pick the next token of every row in a batch: grammar masks, min_tokens, penalties,
temperature, top-k, top-p, min-p, seeds.

Rows differ in their settings, so the filters work on per-row tensors; rows that want none of
them (greedy, no penalties, no grammar) are one argmax. The logits passed in are not changed
(log-probabilities are read from them afterwards). Sampling draws ``argmax(p / q)`` with ``q`` from an
exponential distribution, which picks token ``i`` with probability ``p_i`` and needs neither a
multinomial nor a device synchronization; each seeded request draws its ``q`` from its own
generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from zerostart.engine._grammar import GrammarEngine, apply_bitmask
from zerostart.engine._sequence import Sequence


def _plain(s: Sequence) -> bool:
    return s.params.greedy and not s.params.penalized and s.matcher is None and not s.holds_stop


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int | None) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.grammar: GrammarEngine | None = None  # set by the engine with the first constrained request
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        # logits: [N, V] float32, row i belongs to seqs[i]
        if all(_plain(s) for s in seqs):
            return logits.argmax(dim=-1).tolist()
        logits = logits.clone()
        self._constrain(logits, seqs)
        self._hold_stops(logits, seqs)
        self._penalize(logits, seqs)
        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            return logits.argmax(dim=-1).tolist()
        out = logits.argmax(dim=-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        idx = torch.tensor(rows, device=logits.device)
        sub = logits[idx] if len(rows) < len(seqs) else logits
        sampled = self._sample(sub, [seqs[i] for i in rows])
        out[idx] = sampled
        return out.tolist()

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return
        assert self.grammar is not None
        bitmask = self.grammar.fill([s.matcher for s in seqs if s.matcher is not None], pin=logits.device.type == "cuda")
        if len(rows) == len(seqs):
            apply_bitmask(logits, bitmask)
        else:
            idx = torch.tensor(rows, device=logits.device)
            sub = logits[idx]
            apply_bitmask(sub, bitmask)
            logits[idx] = sub

    def _hold_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        # min_tokens: end-of-sequence and stop tokens are not allowed yet, unless a grammar
        # leaves nothing else (then the grammar, which must end, wins)
        for i, s in enumerate(seqs):
            if not s.holds_stop or not s.stop_ids:
                continue
            row = logits[i]
            held = row.clone()
            held[torch.tensor(sorted(s.stop_ids), device=row.device)] = float("-inf")
            if s.matcher is None:
                row.copy_(held)
            else:
                row.copy_(torch.where(held.isfinite().any(), held, row))

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, s in enumerate(seqs):
            p = s.params
            if not p.penalized or s.counts is None:
                continue
            counts = s.counts
            if p.presence_penalty or p.frequency_penalty:
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(counts.dtype)
            if p.repetition_penalty != 1:
                # transformers' and vLLM's rule, over the prompt's and the output's tokens
                seen = counts > 0
                if s.prompt_seen is not None:
                    seen |= s.prompt_seen
                row = logits[i]
                scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                logits[i] = torch.where(seen, scaled, row)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        n, V = logits.shape
        dev = logits.device
        temps = torch.tensor([s.params.temperature for s in seqs], device=dev, dtype=torch.float32)
        logits = logits / temps[:, None]
        top_ks = [s.params.top_k for s in seqs]
        if any(0 < k < V for k in top_ks):
            k_max = min(max(top_ks), V)
            ks = torch.tensor([k if 0 < k < V else V for k in top_ks], device=dev)
            top = logits.topk(k_max, dim=-1).values  # [n, k_max], descending
            kth = top.gather(1, (ks.clamp(max=k_max) - 1)[:, None])
            kth = torch.where((ks >= V)[:, None], torch.full_like(kth, -float("inf")), kth)
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = logits.softmax(dim=-1)
        top_ps = [s.params.top_p for s in seqs]
        if any(p < 1.0 for p in top_ps):
            ps = torch.tensor(top_ps, device=dev, dtype=torch.float32)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
            drop = before >= ps[:, None]  # the first token is never dropped
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        min_ps = [s.params.min_p for s in seqs]
        if any(m > 0 for m in min_ps):
            ms = torch.tensor(min_ps, device=dev, dtype=torch.float32)
            probs = probs.masked_fill(probs < ms[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        q = torch.empty_like(probs)
        shared = [i for i, s in enumerate(seqs) if s.generator is None]
        if shared:
            if len(shared) == n:
                q.exponential_(generator=self.generator)
            else:
                q[shared] = torch.empty(len(shared), V, device=dev).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                q[i].exponential_(generator=s.generator)
        q.clamp_(min=1e-20)  # an exact 0 would turn a zero-probability token into 0/0 = NaN
        return (probs / q).argmax(dim=-1)
