"""Log-probabilities in the OpenAI API's shapes (which vLLM follows).

Chat (``logprobs: true, top_logprobs: k``)::

    {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                  "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}, ...]}, ...]}

Completions (``logprobs: k``; with ``echo`` the prompt's tokens come first, the first of them
with ``null``s since nothing predicts it)::

    {"tokens": ["Hi", ...], "token_logprobs": [null, -0.1, ...],
     "top_logprobs": [null, {"Hi": -0.1, ...}, ...], "text_offset": [0, 2, ...]}

A completion's ``top_logprobs`` holds the ``k`` likeliest tokens and the chosen one (so up to
k + 1 entries, as OpenAI documents); ``text_offset`` is each token's character offset in the
returned text.
"""

from __future__ import annotations

from typing import Any, Callable

from zerostart.engine import TokenLogprob

TextOf = Callable[[int], "tuple[str, bytes]"]  # token id -> (text, bytes): zerostart.engine.TokenText


def chat_entry(text_of: TextOf, lp: TokenLogprob) -> dict[str, Any]:
    text, data = text_of(lp.token_id)
    return {"token": text, "logprob": lp.logprob, "bytes": list(data),
            "top_logprobs": [{"token": text_of(t)[0], "logprob": v, "bytes": list(text_of(t)[1])} for t, v in lp.top]}


def chat_logprobs(text_of: TextOf, lps: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [chat_entry(text_of, lp) for lp in lps]}


class CompletionLogprobs:
    """The completion shape, built token by token (the prompt's first when echoed)."""

    def __init__(self, text_of: TextOf, offset: int = 0) -> None:
        self._text_of = text_of
        self.offset = offset  # characters before the next token in the returned text
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add_first(self, token_id: int) -> None:
        """A token nothing predicts (the prompt's first): text, no logprob."""
        text = self._text_of(token_id)[0]
        self._append(text, None, None)

    def add(self, lp: TokenLogprob) -> None:
        text = self._text_of(lp.token_id)[0]
        top = {self._text_of(t)[0]: v for t, v in lp.top}
        top.setdefault(text, lp.logprob)  # the chosen token is always listed
        self._append(text, lp.logprob, top)

    def _append(self, text: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def body(self, start: int = 0) -> dict[str, Any]:
        """The shape for tokens [start:] (a stream sends each chunk's own)."""
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}
