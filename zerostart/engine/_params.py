"""What a request asks for (:class:`SamplingParams`) and what comes back (:class:`TokenEvent`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from zerostart.engine._config import EngineError

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class SamplingParams:
    """How to pick tokens; validated on construction (errors name the field).

    temperature 0 is greedy; top_k 0 and top_p 1.0 turn those filters off; ``seed`` makes the
    sampled tokens reproducible; penalties follow the OpenAI definitions (subtracted from the
    logits of tokens already generated: once for presence, per occurrence for frequency).
    ``stop`` strings end the stream and are not part of the text; so are ``stop_token_ids``
    and the model's end-of-sequence tokens (unless ``ignore_eos``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise EngineError(f"SamplingParams.{name} must be a finite number (got {v!r})")
            return float(v)

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise EngineError(f"SamplingParams.{name} must be an integer (got {v!r})")
            return v

        if integer("max_tokens") < 1:
            raise EngineError(f"SamplingParams.max_tokens must be at least 1 (got {self.max_tokens})")
        if number("temperature") < 0:
            raise EngineError(f"SamplingParams.temperature must be >= 0 (got {self.temperature})")
        if not 0 < number("top_p") <= 1:
            raise EngineError(f"SamplingParams.top_p must be in (0, 1] (got {self.top_p})")
        if integer("top_k") < 0:
            raise EngineError(f"SamplingParams.top_k must be >= 0 (0 = off) (got {self.top_k})")
        if self.seed is not None:
            integer("seed")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise EngineError(f"SamplingParams.{name} must be in [-2, 2] (got {getattr(self, name)})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise EngineError(f"SamplingParams.stop must be a list of non-empty strings (got {self.stop!r})")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise EngineError(f"SamplingParams.stop_token_ids must be a list of token ids (got {self.stop_token_ids!r})")
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise EngineError(f"SamplingParams.ignore_eos must be true or false (got {self.ignore_eos!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True)
class TokenEvent:
    """One step of a stream: a generated token and the text it completed.

    ``text`` is the new text (whole UTF-8 characters, stop strings removed; may be empty while
    characters or a possible stop string are pending). The last event has ``finish_reason`` set:
    "stop" (end-of-sequence, stop token or stop string), "length" (max_tokens or the context
    is full) or "abort" (cancelled, or the engine stopped; then ``token_id`` is None).
    """

    token_id: int | None
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "text": self.text, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
