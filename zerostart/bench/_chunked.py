"""``zerostart bench generate``'s scheduling measurements: how long a short request waits
behind a long prompt (``--long-tokens``), what each prefill chunk size costs (``--chunks``), and
the ATen operators one batch-1 decode step runs (the per-op overhead).

- Behind a long prompt: one ``--long-tokens`` prompt is prefilled; from a quarter of the way
  on, a short chat request arrives every other step. Its first token should come after about
  one chunk's time: the step it arrives in, not the rest of the long prompt. Timed against the
  step just before it (the long prompt alone: one chunk's time at that context), ``--repeat``
  times as the long prompt goes on.
- Chunk sizes: the same prompt prefilled with each ``prefill_chunk`` (one engine each, runs
  interleaved): prefill tokens/s, and the longest step, which is the longest gap between two
  tokens of every request decoding beside the prefill.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from zerostart.bench._engine_run import sync
from zerostart.bench._env import log
from zerostart.engine import SamplingParams


def ops_per_token(engine: Any) -> dict[str, int]:
    """ATen operators of one batch-1 decode step: every call the profiler records (nested ones
    included: what the per-op overhead is paid for), and the top-level calls the model makes."""
    from torch.profiler import profile  # torch: not at import, which generate's cold-start children time

    handle = engine.submit(list(range(300, 332)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.step()  # prefill and the first token
    engine.step()  # a decode step (warm)
    with profile() as prof:
        engine.step()
    handle.cancel()
    while not handle.finished:
        engine.step()
    events = [ev for ev in prof.events() if ev.name.startswith("aten::")]

    def top(ev) -> bool:
        p = ev.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    return {"aten_ops": len(events), "top_level": sum(map(top, events))}


def behind_long(engine: Any, ids: list[int], repeat: int, device: str) -> dict[str, Any]:
    """A short chat request's first token, arriving while ``ids`` are prefilled."""
    chunk, long_tokens = engine.config.prefill_chunk, len(ids)
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=True)
    long = engine.submit(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    for _ in range(long_tokens // 4 // chunk):
        engine.step()
    chunk_s, first_s, first_steps = [], [], []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        engine.step()  # the long prompt alone: one chunk
        sync(device)
        chunk_s.append(time.perf_counter() - t)
        short = engine.submit(chat, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        t, steps = time.perf_counter(), 0
        while short.get(timeout=0) is None:
            engine.step()
            steps += 1
        sync(device)
        first_s.append(time.perf_counter() - t)
        first_steps.append(steps)
        short.cancel()  # taken out at the next step
        if long.finished:
            raise RuntimeError(f"--long-tokens {long_tokens} were prefilled before {repeat} short requests came; "
                               "raise --long-tokens or lower --repeat")
    long.cancel()
    while not long.finished:
        engine.step()
    med_chunk, med_first = statistics.median(chunk_s), statistics.median(first_s)
    log(f"behind a {long_tokens}-token prompt: first token {med_first:.2f} s, one chunk {med_chunk:.2f} s")
    return {"long_tokens": long_tokens, "chunk": chunk, "short_prompt_tokens": len(chat), "chunk_s": chunk_s,
            "first_token_s": first_s, "first_token_steps": first_steps, "median_chunk_s": med_chunk,
            "median_first_token_s": med_first, "first_token_in_chunks": med_first / med_chunk}


def chunk_sweep(model: str, dtype: str, chunks: list[int], ids: list[int], repeat: int, device: str,
                config: Any) -> list[dict[str, Any]]:
    """The prompt ``ids`` prefilled with each prefill chunk size, runs interleaved."""
    from zerostart.engine import Engine  # torch: not at import, which generate's cold-start children time

    engines = {c: Engine.from_pretrained(model, device=device, dtype=dtype,
                                         config=dataclasses.replace(config, prefill_chunk=c, max_num_seqs=1))
               for c in chunks}
    tokens = len(ids)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    runs: dict[int, list[tuple[float, float]]] = {c: [] for c in chunks}

    def run(e) -> tuple[float, float]:
        h = e.submit(ids, params)
        total, longest = 0.0, 0.0
        while not h.finished:
            sync(device)
            t = time.perf_counter()
            e.step()
            sync(device)
            dt = time.perf_counter() - t
            total, longest = total + dt, max(longest, dt)
        return total, longest

    for c in chunks:  # a warm-up each
        run(engines[c])
    for _ in range(repeat):
        for c in chunks:
            runs[c].append(run(engines[c]))
    for e in engines.values():
        e.stop()
    rows = []
    for c in chunks:
        total = statistics.median(r[0] for r in runs[c])
        longest = statistics.median(r[1] for r in runs[c])
        rows.append({"chunk": c, "tokens": tokens, "seconds": [r[0] for r in runs[c]],
                     "longest_step_s": [r[1] for r in runs[c]], "tokens_per_s": tokens / total,
                     "median_longest_step_s": longest})
        log(f"prefill chunk {c}: {tokens / total:.0f} tok/s, longest step {longest:.2f} s")
    return rows


def table(r: dict[str, Any]) -> list[str]:
    """The scheduling measurements' lines of ``zerostart bench generate``'s report."""
    lines = []
    ops = r.get("ops_per_token") or {}
    for dtype, o in ops.items():
        lines.append(f"{dtype} batch-1 decode step: {o['aten_ops']} ATen calls ({o['top_level']} top-level)")
    b = r.get("behind_long")
    if b:
        lines.append(f"a {b['short_prompt_tokens']}-token chat request arriving while a {b['long_tokens']}-token "
                     f"prompt (prefill chunk {b['chunk']}), median of {len(b['first_token_s'])}: first token "
                     f"{b['median_first_token_s']:.2f} s = {b['first_token_in_chunks']:.2f} x one chunk's step "
                     f"({b['median_chunk_s']:.2f} s), in {max(b['first_token_steps'])} step(s) at most")
    sweep = r.get("chunks")
    if sweep:
        lines.append(f"prefill chunk sizes: one {sweep[0]['tokens']}-token prompt, median of {len(sweep[0]['seconds'])}")
        lines.append(f"{'chunk':>7}  {'prefill tok/s':>13}  {'longest step s':>14}")
        for row in sweep:
            lines.append(f"{row['chunk']:>7}  {row['tokens_per_s']:>13.0f}  {row['median_longest_step_s']:>14.2f}")
    return lines
