"""What a request asks for (:class:`SamplingParams`, :class:`PoolingParams`, :class:`Constraint`)
and what comes back (:class:`TokenEvent`, :class:`TokenLogprob`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from zerostart.engine._errors import EngineError

FINISH_REASONS = ("stop", "length", "abort")
# Seeds torch's generators take: 64 bits, signed or not (a negative seed is its two's complement).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
CONSTRAINT_KINDS = ("json_schema", "json_object", "lark", "regex")
POOLING = ("last", "mean")
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs


# JSON whitespace in constrained output: runs of at most 16 characters (indentation fits), so
# that a model cannot stall a request by emitting whitespace forever, a known way for
# constrained JSON to loop (the grammars of response formats and of tool calls alike)
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"


@dataclass(frozen=True)
class Constraint:
    """Output that must match a grammar (grammar-constrained decoding).

    ``kind`` "json_schema" (``spec``: the schema, a dict), "json_object" (any JSON object; no
    spec), "lark" (``spec``: a Lark grammar in llguidance's dialect, which may embed JSON
    schemas as ``%json{...}``) or "regex" (``spec``: a regular expression). The engine compiles
    it on submit; a grammar it cannot compile is an :class:`EngineError` naming the problem.
    """

    kind: str
    spec: Any = None

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise EngineError(f"Constraint.kind must be one of {', '.join(CONSTRAINT_KINDS)} (got {self.kind!r})")
        if self.kind == "json_schema" and not isinstance(self.spec, (dict, bool)):
            raise EngineError(f"a json_schema constraint needs the schema as an object (got {type(self.spec).__name__})")
        if self.kind in ("lark", "regex") and not (isinstance(self.spec, str) and self.spec):
            raise EngineError(f"a {self.kind} constraint needs its grammar as a non-empty string")

    def key(self) -> str:
        """One string per distinct grammar (what compiled grammars are cached by)."""
        return self.kind + ":" + (json.dumps(self.spec, sort_keys=True) if self.kind == "json_schema" else str(self.spec))


@dataclass
class SamplingParams:
    """How to pick tokens; validated on construction (errors name the field).

    temperature 0 is greedy; top_k 0 and top_p 1.0 turn those filters off; ``seed`` makes the
    sampled tokens reproducible; penalties follow the OpenAI definitions (subtracted from the
    logits of tokens already generated: once for presence, per occurrence for frequency).
    ``stop`` strings end the stream and are not part of the text; so are ``stop_token_ids``
    and the model's end-of-sequence tokens (unless ``ignore_eos``).

    ``min_tokens`` keeps end-of-sequence, stop tokens and stop strings from ending the stream
    before that many tokens; ``repetition_penalty`` (> 0, 1 = off) divides the positive logits
    and multiplies the negative ones of every token in the prompt or the output (as
    transformers and vLLM do); ``min_p`` drops tokens whose probability is below ``min_p``
    times the most likely one's. ``max_tokens`` 0 generates nothing (scoring a prompt).

    ``logprobs`` (0..20) returns each generated token's log-probability and that many most
    likely alternatives; ``prompt_logprobs`` does the same for every prompt token after the
    first. Log-probabilities are the model's own distribution (log-softmax of the raw logits,
    before penalties, temperature, filters and grammar masks), as vLLM reports them by default.
    ``constraint`` restricts the output to a grammar; ``skip_special_tokens`` False keeps
    special tokens (e.g. a ``[TOOL_CALLS]`` marker) in the text.
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
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None
    skip_special_tokens: bool = True

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

        if integer("max_tokens") < 0:
            raise EngineError(f"SamplingParams.max_tokens must be >= 0 (got {self.max_tokens})")
        if integer("min_tokens") < 0:
            raise EngineError(f"SamplingParams.min_tokens must be >= 0 (got {self.min_tokens})")
        if self.min_tokens > self.max_tokens:
            raise EngineError(f"SamplingParams.min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if number("repetition_penalty") <= 0:
            raise EngineError(f"SamplingParams.repetition_penalty must be > 0 (1 = off) (got {self.repetition_penalty})")
        if not 0 <= number("min_p") <= 1:
            raise EngineError(f"SamplingParams.min_p must be in [0, 1] (got {self.min_p})")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= integer(name) <= MAX_LOGPROBS:
                raise EngineError(f"SamplingParams.{name} must be in [0, {MAX_LOGPROBS}] (got {getattr(self, name)})")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise EngineError(f"SamplingParams.constraint must be a Constraint (got {type(self.constraint).__name__})")
        if not isinstance(self.skip_special_tokens, bool):
            raise EngineError(f"SamplingParams.skip_special_tokens must be true or false (got {self.skip_special_tokens!r})")
        if number("temperature") < 0:
            raise EngineError(f"SamplingParams.temperature must be >= 0 (got {self.temperature})")
        if not 0 < number("top_p") <= 1:
            raise EngineError(f"SamplingParams.top_p must be in (0, 1] (got {self.top_p})")
        if integer("top_k") < 0:
            raise EngineError(f"SamplingParams.top_k must be >= 0 (0 = off) (got {self.top_k})")
        if self.seed is not None and not SEED_MIN <= integer("seed") <= SEED_MAX:
            raise EngineError(f"SamplingParams.seed must be in [{SEED_MIN}, {SEED_MAX}] (a 64-bit seed; got {self.seed})")
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
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class PoolingParams:
    """An embedding request: the final hidden states of the prompt pooled into one vector.

    ``pooling`` "last" (the last token's state, as Qwen3-Embedding and other decoder
    embedders use) or "mean" (the average over the prompt's tokens); ``normalize`` scales it
    to unit L2 norm; ``dimensions`` keeps the first that many values (Matryoshka-style
    truncation, before normalizing), None keeps all.
    """

    pooling: str = "last"
    normalize: bool = True
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLING:
            raise EngineError(f"PoolingParams.pooling must be one of {', '.join(POOLING)} (got {self.pooling!r})")
        if not isinstance(self.normalize, bool):
            raise EngineError(f"PoolingParams.normalize must be true or false (got {self.normalize!r})")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise EngineError(f"PoolingParams.dimensions must be a positive integer (got {self.dimensions!r})")


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the ``top`` most likely tokens at its position
    ((token id, logprob) pairs, most likely first; empty unless asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first event; None for the first token
    embedding: list[float] | None = None  # on the only event of a PoolingParams request
    at: float = field(default_factory=time.monotonic)  # when the engine made it (time.monotonic)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token_id": self.token_id, "text": self.text, "finish_reason": self.finish_reason,
                               "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        if self.logprob is not None:
            out["logprob"] = _logprob_dict(self.logprob)
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = [None if p is None else _logprob_dict(p) for p in self.prompt_logprobs]
        if self.embedding is not None:
            out["embedding"] = self.embedding
        return out


def _logprob_dict(p: TokenLogprob) -> dict[str, Any]:
    return {"token_id": p.token_id, "logprob": p.logprob, "top": [list(t) for t in p.top]}
