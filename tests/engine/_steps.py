"""What tests of the engine's step read from it: every step's logits."""

from __future__ import annotations

import torch

from zerostart.engine import Engine, SamplingParams


def step_logits(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[torch.Tensor]:
    """Every step's logits (those the sampler gets) while ``jobs`` (prompt, params) run together,
    stepped here."""
    seen: list[torch.Tensor] = []
    sampler = engine.sampler

    def spy(logits, seqs):
        seen.append(logits.clone())
        return sampler(logits, seqs)

    engine.sampler = spy  # the engine calls it as it calls the sampler
    try:
        handles = [engine.submit(p, params) for p, params in jobs]
        while not all(h.finished for h in handles):
            engine.step()
    finally:
        engine.sampler = sampler
    return seen
