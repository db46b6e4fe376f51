"""Grammar-constrained decoding with llguidance: compile a :class:`Constraint`, keep one matcher
per sequence, and turn the matchers' allowed tokens into a logits mask for the batch.

Why llguidance (``bench/grammar_engines.py`` measured it against xgrammar and outlines-core
on this model's tokenizer; docs/engine.md has the table): it reads the model's
``tokenizer.json`` directly (no transformers), compiles a JSON schema in about a millisecond
(outlines-core builds a regex automaton over the vocabulary per schema, which takes seconds
and cannot express arbitrary JSON), computes a mask in tens of microseconds, handles Lark
grammars that embed JSON schemas (the tool-call formats) and imports in a tenth of a second
(xgrammar pulls in transformers and triton: seconds, on a path where cold starts matter).

Masks are bitmasks: int32 words [rows, ceil(vocab / 32)], bit ``t % 32`` of word ``t // 32``
set when token ``t`` is allowed. They are filled on the CPU (llguidance's executor fills rows
in parallel) and applied to the logits on their device.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from zerostart.engine._errors import EngineError
from zerostart.engine._params import JSON_WHITESPACE, Constraint
from zerostart.engine._tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # only in llguidance's stubs

# distinct grammars kept compiled per engine: a large one holds megabytes (~13 MB at 100 KB of schema)
_COMPILED_CACHE = 16
JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": JSON_WHITESPACE}


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf, in place. logits [n, V]; bitmask [n, ceil(V/32)] int32."""
    n, V = logits.shape
    dev = logits.device
    bits = (1 << torch.arange(32, dtype=torch.int64, device=dev)).to(torch.int32)  # bit 31 wraps to INT_MIN
    allowed = (bitmask.to(dev, non_blocking=True).unsqueeze(-1) & bits).view(n, -1)[:, :V]
    torch.where(allowed.bool(), logits, torch.tensor(float("-inf"), device=dev), out=logits)


class GrammarEngine:
    """llguidance over one tokenizer (built once per engine, on the first constrained request)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: frozenset[int]) -> None:
        try:
            # llguidance only for a constrained request
            import llguidance
        except ImportError:
            raise EngineError("structured output needs the llguidance package: pip install llguidance") from None
        self._ll = llguidance
        # n_vocab: the model's vocabulary, which may be padded past the tokenizer's; padding is never allowed
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                                eos_token=sorted(eos_ids) or None)
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._executor = llguidance.LLExecutor()
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # constraint key -> LLMatcher in its start state
        self._lock = threading.Lock()  # the cache; compiles run outside it, on the callers' threads
        # errors name the problem without the whole grammar and parser state (megabytes for a large schema)
        self._limits = llguidance.LLParserLimits(verbose_errors=False)

    def compile(self, c: Constraint) -> Any:
        """The compiled grammar of a constraint: an llguidance matcher in its start state, kept
        (``_COMPILED_CACHE`` of them) and copied for each sequence. Thread-safe; the compile
        itself (seconds for a schema of thousands of properties) runs without the GIL, so it
        belongs on a thread of its own, never on an event loop. An EngineError names what is wrong."""
        key = c.key()
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
        M = self._ll.LLMatcher
        try:
            if c.kind == "json_schema":
                grammar = M.grammar_from_json_schema(c.spec, defaults=JSON_OPTIONS)
            elif c.kind == "json_object":
                grammar = M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            elif c.kind == "lark":
                grammar = M.grammar_from_lark(c.spec)
            else:
                grammar = M.grammar_from_regex(c.spec)
        except ValueError as e:
            raise EngineError(f"{c.kind}: {e}") from None
        start = M(self.tokenizer, grammar, log_level=0, limits=self._limits)  # an error leaves it in an error state
        if start.is_error():
            raise EngineError(f"{c.kind}: the grammar cannot be used: {_message(start)}")
        _first_steps(start, c)
        with self._lock:
            self._compiled[key] = start
            if len(self._compiled) > _COMPILED_CACHE:
                self._compiled.popitem(last=False)
        return start

    def matcher(self, c: Constraint) -> "Matcher":
        """A matcher of its own for one sequence: a copy of the compiled grammar (milliseconds,
        where compiling may take seconds)."""
        m = self.compile(c).deep_copy()
        if m.is_error():
            raise EngineError(f"{c.kind}: {_message(m)}")
        return Matcher(m)

    def fill(self, matchers: list["Matcher"], pin: bool = False) -> torch.Tensor:
        """Bitmasks [len(matchers), words] int32 of the tokens each matcher allows next (on the
        CPU; pinned with ``pin``, for an asynchronous copy to a GPU)."""
        # llguidance.torch is not imported: its module-level torch.compile pulls in dynamo (seconds)
        bitmask = torch.empty(len(matchers), self.words, dtype=torch.int32, pin_memory=pin)
        row = self.words * 4
        if len(matchers) == 1:
            matchers[0].m.unsafe_compute_mask_ptr(bitmask.data_ptr(), row)
        else:
            self._executor.unsafe_compute_mask_ptr([(mt.m, i) for i, mt in enumerate(matchers)],
                                                   bitmask.data_ptr(), row, len(matchers))
        return bitmask


def _first_steps(start: Any, c: Constraint) -> None:
    """Walk a copy of a compiled grammar through its forced first tokens (a JSON object's
    ``{``), computing the masks on the way: what only parsing finds (a grammar too ambiguous to
    parse, as thousands of optional properties make it) is an error of the request here, on the
    compiling thread, rather than of a step in the engine."""
    walk = start.deep_copy()
    walk.compute_bitmask()
    forced = walk.compute_ff_tokens() if not walk.is_error() else []
    if forced and walk.consume_tokens(forced):
        walk.compute_bitmask()
    if walk.is_error():
        raise EngineError(f"{c.kind}: the grammar cannot be used: {_message(walk)}")


def _message(m: Any) -> str:
    return m.get_error().replace("<non-verbose/>", "").strip() or "invalid"


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, m: Any) -> None:
        self.m = m

    def accept(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise EngineError(f"the grammar refused token {token}: {_message(self.m)}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing but end-of-sequence."""
        return self.m.is_stopped()
