"""What one forward step computes: a flat batch of tokens and where their keys and values go.

A step mixes two kinds of rows (continuous batching with chunked prefill):

- decode rows ``[0, num_decode)``: one token each; row ``i`` belongs to KV cache slot ``i``
  (slots without a decoding sequence ride along as filler rows that write only to the cache's
  scratch position and are never read), so the cache of the whole group is one strided view.
  When few of the slots below the highest one decode (``decode_slots`` set), the rows are just
  the decoding sequences and their keys are gathered instead. Their keys and values are
  written where ``kv_slots`` and ``kv_pos`` say;
- prefill chunks after them: consecutive prompt tokens of one sequence each, written into
  the slot as one slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Prefill:
    slot: int  # KV cache slot of the sequence
    start: int  # cache position of the chunk's first token
    length: int  # tokens in the chunk
    row: int  # first row of the chunk in the flat batch


@dataclass
class StepContext:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, rotary positions
    kv_slots: torch.Tensor | None = None  # [num_decode] int64, cache slot each decode row writes to
    kv_pos: torch.Tensor | None = None  # [num_decode] int64, cache position each decode row writes to
    num_decode: int = 0
    decode_len: int = 0  # decode rows attend to cache positions [0, decode_len)
    decode_lens: torch.Tensor | None = None  # [num_decode] int64, keys each decode row sees (its position + 1)
    decode_slots: torch.Tensor | None = None  # [num_decode] int64 slots of gathered decode rows; None = dense
    prefills: list[Prefill] = field(default_factory=list)
    logits_rows: torch.Tensor | None = None  # [N] rows whose logits are needed; None = every row
    hidden_rows: torch.Tensor | None = None  # [M] rows whose final (normed) hidden states are needed
    hidden_out: torch.Tensor | None = None  # [M, hidden], set by the model when hidden_rows is given
    # filled by the model once per step: decode masks [num_decode, 1, 1, decode_len], True = attend
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    prefill_masks: dict[tuple[int, int | None], torch.Tensor | None] = field(default_factory=dict)
