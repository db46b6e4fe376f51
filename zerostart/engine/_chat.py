"""Chat messages with tools -> prompt text, through the model's own chat template.

OpenAI-shaped messages are made into what chat templates expect (as transformers and vLLM
pass them): an assistant's ``tool_calls`` carry ``function.arguments`` as an object, not a
JSON string; ``role: tool`` messages keep their ``tool_call_id`` and ``name``. The tools go to
the template as ``tools``.

A template that knows nothing of tools (it never mentions ``tools``, e.g. SmolLM2's) gets them
in the Hermes style that Qwen2.5's template writes: a system message listing the functions
and asking for ``<tool_call>`` blocks, assistant tool calls written as those blocks, and tool
results as ``<tool_response>`` blocks in a user turn (consecutive results share one turn, so
templates that insist on alternating roles still render). :func:`needs_fallback` says when,
and the Hermes parser reads what such a model writes back.
"""

from __future__ import annotations

import json
from typing import Any

from zerostart.engine._errors import EngineError
from zerostart.engine._tokenizer import Tokenizer

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>")


def template_source(tokenizer: Tokenizer, chat_template: str | None = None, tools: list | None = None) -> str:
    return tokenizer.get_chat_template(chat_template, tools)


def needs_fallback(source: str) -> bool:
    """The template cannot render tools itself (it never reads a ``tools`` variable)."""
    return "tools" not in source


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], *, tools: list[dict] | None = None,
                add_generation_prompt: bool = True, chat_template: str | None = None,
                **kwargs: Any) -> str:
    """The prompt text for ``messages`` (OpenAI's shape) and ``tools`` (OpenAI's function tools)."""
    source = template_source(tokenizer, chat_template, tools)
    msgs = [_normalize(i, m) for i, m in enumerate(messages)]
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in msgs)
    if uses_tools and needs_fallback(source):
        msgs = _hermes_messages(msgs, tools or [])
        tools = None
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tools=tools or None,
                                        chat_template=chat_template, **kwargs)
    assert isinstance(out, str)
    return out


def _normalize(i: int, m: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise EngineError(f"messages[{i}] must be an object with a role")
    out = dict(m)
    calls = out.get("tool_calls")
    if calls:
        fixed = []
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise EngineError(f"messages[{i}].tool_calls[{j}] needs function.name")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise EngineError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON") from None
            fixed.append({**c, "type": "function", "function": {"name": fn["name"], "arguments": args}})
        out["tool_calls"] = fixed
    return out


def _hermes_messages(msgs: list[dict[str, Any]], tools: list[dict]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = HERMES_SYSTEM.format(tools=listing)
        if msgs and msgs[0]["role"] == "system":
            system = f"{msgs[0].get('content') or ''}\n\n{system}"
            msgs = msgs[1:]
        out.append({"role": "system", "content": system})
    for m in msgs:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                 ensure_ascii=False) for c in m["tool_calls"]]
            text = (m.get("content") or "").strip()
            body = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
            out.append({"role": "assistant", "content": f"{text}\n{body}" if text else body})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        else:
            out.append({**m, "content": m.get("content") or ""})
    return [{k: v for k, v in m.items() if k != "_tool_turn"} for m in out]
