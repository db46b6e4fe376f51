"""One token as text and as bytes, for log-probability listings (OpenAI's ``token`` and ``bytes``).

A token may hold part of a UTF-8 character (byte-level BPE splits characters; sentencepiece
falls back to ``<0xNN>`` byte tokens), so its bytes come from the vocabulary entry: GPT-2's
byte-to-printable mapping inverted, or the byte-fallback value; its text is the bytes decoded,
or ``bytes:\\xNN...`` when they are not whole characters, as OpenAI writes such tokens.
"""

from __future__ import annotations

import re
from functools import lru_cache

from zerostart.engine._tokenizer import Tokenizer

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    # GPT-2's printable stand-ins for the 256 bytes, inverted
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenText:
    """Text and bytes of token ids for one tokenizer (cached per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        decoded = self._tok.decode([token_id])
        if "\ufffd" not in decoded:
            return decoded, decoded.encode()
        raw = self._tok.id_to_token(token_id) or ""
        m = _BYTE_FALLBACK.match(raw)
        if m:
            data = bytes([int(m.group(1), 16)])
        else:
            table = _byte_of()
            data = bytes(table[c] for c in raw) if raw and all(c in table for c in raw) else decoded.encode()
        try:
            return data.decode("utf-8"), data
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data), data
