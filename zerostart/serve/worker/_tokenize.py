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
from zerostart.serve.edge import BadRequest, DetokenizeRequest, TokenizeRequest


def tokenize(tok: Tokenizer, max_model_len: int, req: TokenizeRequest) -> dict[str, Any]:
    if req.messages is not None:
        try:
            text = render_chat(tok, [m.template_message() for m in req.messages],
                               tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                               add_generation_prompt=req.add_generation_prompt)
        except EngineError as e:
            raise BadRequest(f"messages: {e}", param="messages") from None
        ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
    else:
        assert req.prompt is not None
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    strs = [tok.id_to_token(i) for i in ids] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(tok: Tokenizer, req: DetokenizeRequest) -> dict[str, Any]:
    if any(i >= tok.vocab_size for i in req.tokens):
        raise BadRequest(f"tokens: a token id is outside the vocabulary [0, {tok.vocab_size})", param="tokens")
    return {"prompt": tok.decode(req.tokens)}


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
