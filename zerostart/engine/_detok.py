"""Streaming detokenization: text deltas that are whole UTF-8 characters, with stop strings cut.

Decoding token by token breaks characters whose bytes span tokens and loses the spaces that
sentencepiece-style decoders strip at the start. So each step decodes a short window of the
latest tokens twice, with and without the new ones, and emits the difference once it no longer
ends in an incomplete character (U+FFFD). Concatenated deltas equal decoding all tokens at once.

Stop strings are never emitted: text that could still grow into one is held back until it
cannot; when one appears, the text before it is emitted and the stream stops.
"""

from __future__ import annotations

from zerostart.engine._tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start (token index)
        self._read = 0  # tokens already turned into text
        self._text = ""  # decoded text so far (emitted + held back)
        self._emitted = 0  # characters of _text handed out
        self._stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text[: self._emitted]

    def add(self, token_id: int, stop: bool = True) -> str:
        """Append a token; return the new text that is safe to emit (may be empty). With ``stop``
        False (min_tokens not reached) stop strings are not looked for in the text so far."""
        self.ids.append(token_id)
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read], skip_special_tokens=self._skip)
        new_text = self._tok.decode(self.ids[self._prefix :], skip_special_tokens=self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
        if not stop:
            out = self._text[self._emitted :]
            self._emitted = len(self._text)
            return out
        return self._release(final=False)

    def finish(self) -> str:
        """Flush at the end of the stream: the rest of the text, incomplete characters included."""
        full = self._tok.decode(self.ids, skip_special_tokens=self._skip)
        if full.startswith(self._text):
            self._text = full
        else:  # the windowed decode disagreed with the full one; keep what was emitted, add the tail
            self._text += self._tok.decode(self.ids[self._read :], skip_special_tokens=self._skip)
        self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self._text)
        if self._stop:
            # a stop string may start up to len(stop) - 1 characters before the new text
            start = max(0, self._emitted - self._longest_stop + 1)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
            elif not final:
                end -= self._held_back(end)
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self, end: int) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        tail = self._text[max(self._emitted, end - self._longest_stop + 1) : end]
        for i in range(len(tail)):
            piece = tail[i:]
            if any(s.startswith(piece) for s in self._stop):
                return len(piece)
        return 0
