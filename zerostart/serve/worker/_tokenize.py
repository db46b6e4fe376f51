"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` in vLLM's shapes (lm-evaluation-harness
uses them as its "remote" tokenizer).

    POST /tokenize    {"model", "prompt": text, "add_special_tokens": true}
                      or {"model", "messages": [...], "add_generation_prompt": true, "tools": [...]}
                      -> {"count", "max_model_len", "tokens", "token_strs"}  (token_strs with
                      "return_token_strs": true, else null)
    POST /detokenize  {"model", "tokens": [...]} -> {"prompt": text}
    GET  /tokenizer_info -> {"eos_token", "bos_token", "pad_token", "chat_template", "model_max_length", ...}
"""

from __future__ import annotations

from typing import Any

from zerostart.engine import EngineError, Tokenizer, render_chat
from zerostart.serve._errors import BadRequest


def tokenize(tok: Tokenizer, max_model_len: int, body: dict[str, Any]) -> dict[str, Any]:
    if isinstance(body.get("messages"), list):
        try:
            text = render_chat(tok, body["messages"], tools=body.get("tools") or None,
                               add_generation_prompt=bool(body.get("add_generation_prompt", True)))
        except EngineError as e:
            raise BadRequest(f"messages: {e}", param="messages") from None
        ids = tok.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))
    elif isinstance(body.get("prompt"), str):
        ids = tok.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
    else:
        raise BadRequest("send either prompt (text) or messages (a chat)", param="prompt")
    strs = [tok.id_to_token(i) for i in ids] if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(tok: Tokenizer, body: dict[str, Any]) -> dict[str, Any]:
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise BadRequest("tokens must be a list of token ids", param="tokens")
    if any(i >= tok.vocab_size for i in ids):
        raise BadRequest(f"a token id is outside the vocabulary [0, {tok.vocab_size})", param="tokens")
    return {"prompt": tok.decode(ids)}


def tokenizer_info(tok: Tokenizer, max_model_len: int) -> dict[str, Any]:
    info: dict[str, Any] = {"tokenizer_class": tok.config.get("tokenizer_class"), "model_max_length": max_model_len,
                            "vocab_size": tok.vocab_size}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        info[key] = tok.special_tokens.get(key)
    try:
        info["chat_template"] = tok.get_chat_template()
    except EngineError:
        info["chat_template"] = None
    return info
