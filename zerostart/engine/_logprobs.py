"""Log-probabilities of chosen tokens and their most likely alternatives, from raw logits.

The model's own distribution: log-softmax of the logits as the model produced them (before
penalties, temperature, filters and grammar masks), as vLLM reports them by default and as
transformers' scores compare. One device-to-host copy per call.
"""

from __future__ import annotations

import torch

from zerostart.engine._params import TokenLogprob


def logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """``logits`` [n, V]: row i's log-probability of ``tokens[i]`` and its ``k`` best tokens."""
    lp = logits.float().log_softmax(dim=-1)
    idx = torch.tensor(tokens, device=lp.device)[:, None]
    chosen = lp.gather(1, idx)[:, 0].tolist()
    if k <= 0:
        return [TokenLogprob(t, c) for t, c in zip(tokens, chosen)]
    top = lp.topk(min(k, lp.shape[-1]), dim=-1)
    values, ids = top.values.tolist(), top.indices.tolist()
    return [TokenLogprob(t, c, tuple(zip(i, v))) for t, c, i, v in zip(tokens, chosen, ids, values)]


def row_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """Per row: None where ``ks[i]`` is None, else the logprob of ``tokens[i]`` with ``ks[i]`` alternatives."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(ks)
    if not rows:
        return out
    k = max(ks[i] or 0 for i in rows)
    sub = logits if len(rows) == len(ks) else logits[torch.tensor(rows, device=logits.device)]
    for i, lp in zip(rows, logprobs(sub, [tokens[i] for i in rows], k)):
        out[i] = lp if len(lp.top) <= (ks[i] or 0) else TokenLogprob(lp.token_id, lp.logprob, lp.top[: ks[i] or 0])
    return out
