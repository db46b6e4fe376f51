"""Tool calls in model output: the formats of the supported families, parsed whole or as a
stream, and the grammars that force them (``tool_choice`` "required" or a named function).

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (Qwen2.5/Qwen3, Hermes;
                 also what :mod:`_chat` teaches templates that know no tools)
    llama3_json  {"name": "f", "parameters": {...}}   optionally after <|python_tag|>, several joined by ";"
    mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]   or (newer tokenizers)
                 [TOOL_CALLS]f[ARGS]{...}

Text before the first call is content. A call that does not parse stays text: nothing the
model wrote is dropped. Grammars are Lark for llguidance with the arguments as ``%json``
schemas; a marker that is a special token is written as that token (``<[id]>``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from zerostart.engine._errors import EngineError
from zerostart.engine._params import JSON_WHITESPACE
from zerostart.engine._tokenizer import Tokenizer

# llguidance's x-guidance options (not _grammar's: this module stays torch-free, as the engine
# package's face is imported by the gateway)
_JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}

PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def tool_parser(name: str | None, tokenizer: Tokenizer, template: str = "") -> "ToolParser":
    """The parser for ``name`` (one of PARSERS), or when None the one the chat template writes
    (Hermes when the template knows no tool format of its own)."""
    if name is None:
        if "[TOOL_CALLS]" in template:
            name = "mistral"
        elif "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
            name = "llama3_json"
        else:
            name = "hermes"
    if name not in PARSERS:
        raise EngineError(f"unknown tool parser {name!r}; choose one of {', '.join(PARSERS)}")
    cls = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}[name]
    return cls(tokenizer, template)


def _schema_of(tool: dict) -> tuple[str, dict]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise EngineError("every tool needs function.name")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise EngineError(f"tool {fn['name']!r}: function.parameters must be a JSON schema object")
    return fn["name"], params


def pick_tools(tools: list[dict], choice: str) -> list[tuple[str, dict]]:
    """(name, parameters schema) of the tools a choice allows: all for "required", else the named one."""
    pairs = [_schema_of(t) for t in tools]
    if choice == "required":
        return pairs
    chosen = [p for p in pairs if p[0] == choice]
    if not chosen:
        raise EngineError(f"tool_choice names function {choice!r}, which is not among the tools "
                          f"({', '.join(n for n, _ in pairs) or 'none'})")
    return chosen


class ToolParser:
    name = ""
    start = ""  # the marker that opens the calls
    keeps_special_tokens = False  # the marker is a special token: decode with skip_special_tokens False

    def __init__(self, tokenizer: Tokenizer, template: str = "") -> None:
        self.tokenizer = tokenizer
        self.template = template
        tid = tokenizer.token_to_id(self.start) if self.start else None
        self._start_token = tid if tid is not None and tid in tokenizer.special_ids else None
        self.keeps_special_tokens = self._start_token is not None

    def _lit(self, text: str) -> str:
        """A grammar literal for a marker: its special token, or its text."""
        tid = self.tokenizer.token_to_id(text)
        if tid is not None and tid in self.tokenizer.special_ids:
            return f"<[{tid}]>"
        return json.dumps(text)

    # -- parsing --------------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output; content None when the output is only calls."""
        i = self._find_start(text)
        if i < 0:
            return text, []
        parsed = self._calls(text[i:])
        if parsed is None:
            return text, []
        calls, end = parsed
        content = (text[:i].strip() + " " + text[i + end :].strip()).strip()
        return content or None, calls

    def _find_start(self, text: str) -> int:
        return text.find(self.start)

    def _calls(self, text: str) -> tuple[list[ToolCall], int] | None:
        """The calls in ``text`` (which starts at the marker) and where they end; None if they do not parse."""
        raise NotImplementedError

    # -- grammar --------------------------------------------------------------------------

    def grammar(self, tools: list[dict], choice: str, parallel: bool = True) -> str:
        """Lark forcing calls: one or more of any tool ("required"; one only unless ``parallel``),
        or exactly one of the function named ``choice``."""
        raise NotImplementedError

    def stream(self) -> "ToolStream":
        return ToolStream(self)


def _call_schema(pairs: list[tuple[str, dict]], args_key: str) -> dict:
    alts = [{"type": "object", "properties": {"name": {"const": n}, args_key: p},
             "required": ["name", args_key], "additionalProperties": False} for n, p in pairs]
    schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
    return {**schema, "x-guidance": _JSON_OPTIONS}


def _loads_object(text: str) -> dict | None:
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        return None
    return v if isinstance(v, dict) else None


def _args_text(args: Any) -> str | None:
    if isinstance(args, str):  # some models write the arguments as a JSON string
        args = _loads_object(args)
    return None if not isinstance(args, dict) else json.dumps(args, ensure_ascii=False)


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def _calls(self, text: str) -> tuple[list[ToolCall], int] | None:
        calls, end = [], 0
        for m in self._block.finditer(text):
            if text[end : m.start()].strip():  # text between calls: not a run of calls
                break
            obj = _loads_object(m.group(1))
            args = None if obj is None else _args_text(obj.get("arguments", {}))
            if obj is None or not isinstance(obj.get("name"), str) or args is None:
                return None
            calls.append(ToolCall(obj["name"], args))
            end = m.end()
        return (calls, end) if calls else None

    def grammar(self, tools: list[dict], choice: str, parallel: bool = True) -> str:
        schema = json.dumps(_call_schema(pick_tools(tools, choice), "arguments"))
        more = ' ("\\n" call)*' if choice == "required" and parallel else ""
        return (f"start: call{more}\n"
                f'call: {self._lit("<tool_call>")} "\\n" args "\\n" {self._lit("</tool_call>")}\n'
                f"args: %json{schema}\n")


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    start = "<|python_tag|>"

    def _find_start(self, text: str) -> int:
        i = text.find(self.start)
        if i >= 0:
            return i
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("{") else -1

    def _calls(self, text: str) -> tuple[list[ToolCall], int] | None:
        i = len(self.start) if text.startswith(self.start) else 0
        dec = json.JSONDecoder()
        calls = []
        while True:
            while i < len(text) and text[i] in " \n\t":
                i += 1
            try:
                obj, i = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                return None
            args = _args_text(obj.get("parameters", obj.get("arguments", {}))) if isinstance(obj, dict) else None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or args is None:
                return None
            calls.append(ToolCall(obj["name"], args))
            j = i
            while j < len(text) and text[j] in " \n\t":
                j += 1
            if j >= len(text) or text[j] != ";":
                return calls, i
            i = j + 1

    def grammar(self, tools: list[dict], choice: str, parallel: bool = True) -> str:
        schema = json.dumps(_call_schema(pick_tools(tools, choice), "parameters"))
        more = ' ("; " call)*' if choice == "required" and parallel else ""
        return f"start: call{more}\ncall: %json{schema}\n"


class MistralParser(ToolParser):
    name = "mistral"
    start = "[TOOL_CALLS]"

    def _calls(self, text: str) -> tuple[list[ToolCall], int] | None:
        i = len(self.start)
        while i < len(text) and text[i] in " \n\t":
            i += 1
        dec = json.JSONDecoder()
        calls = []
        if text.startswith("[", i):  # [{"name": ..., "arguments": ...}, ...]
            try:
                items, end = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                return None
            for obj in items if isinstance(items, list) else []:
                args = _args_text(obj.get("arguments", {})) if isinstance(obj, dict) else None
                if args is None or not isinstance(obj.get("name"), str):
                    return None
                calls.append(ToolCall(obj["name"], args))
            return (calls, end) if calls else None
        while True:  # name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}
            name, sep, _ = text[i:].partition("[ARGS]")
            if not sep or not name.strip():
                return None
            j = i + len(name) + len("[ARGS]")
            try:
                obj, end = dec.raw_decode(text, j + len(text[j:]) - len(text[j:].lstrip()))
            except json.JSONDecodeError:
                return None
            args = _args_text(obj)
            if args is None:
                return None
            calls.append(ToolCall(name.strip(), args))
            if not text.startswith(self.start, end):
                return calls, end
            i = end + len(self.start)

    def grammar(self, tools: list[dict], choice: str, parallel: bool = True) -> str:
        pairs = pick_tools(tools, choice)
        single = choice != "required" or not parallel
        if "[ARGS]" in self.template:
            alts = " | ".join(f'{json.dumps(n)} {self._lit("[ARGS]")} args{i}' for i, (n, _) in enumerate(pairs))
            rules = "".join(f"args{i}: %json{json.dumps({**p, 'x-guidance': _JSON_OPTIONS})}\n" for i, (_, p) in enumerate(pairs))
            more = "" if single else f" ({self._lit('[TOOL_CALLS]')} call)*"
            return f"start: {self._lit('[TOOL_CALLS]')} call{more}\ncall: {alts}\n{rules}"
        item = _call_schema(pairs, "arguments")
        array = {"type": "array", "items": {k: v for k, v in item.items() if k != "x-guidance"}, "minItems": 1,
                 "x-guidance": _JSON_OPTIONS}
        if single:
            array["maxItems"] = 1
        return f"start: {self._lit('[TOOL_CALLS]')} calls\ncalls: %json{json.dumps(array)}\n"


class ToolStream:
    """Incremental parsing for streamed responses: feed text deltas, get content deltas and
    calls as each completes. Text that may still become a call is held back; at ``finish``
    whatever did not parse as calls is released as content."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._text = ""
        self._sent = 0  # characters released as content
        self._start: int | None = None  # where the calls begin
        self._calls = 0  # calls already handed out

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """(content to send now, calls completed by this delta)."""
        self._text += delta
        if self._start is None:
            i = self.parser._find_start(self._text)
            if i < 0:
                return self._release(len(self._text) - self._held(self._text)), []
            self._start = i
        out = self._release(self._start)
        if not isinstance(self.parser, HermesParser):  # the other formats are whole only at the end
            return out, []
        body = self._text[self._start :]
        end = body.rfind("</tool_call>")
        parsed = self.parser._calls(body[: end + len("</tool_call>")]) if end >= 0 else None
        return out, self._new(parsed[0] if parsed else [])

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the rest of the content, the calls not yet handed out) at the end of the stream."""
        if self._start is None:
            return self._release(len(self._text)), []
        parsed = self.parser._calls(self._text[self._start :])
        if parsed is None:
            if self._calls == 0:  # no call parsed: it was text after all
                return self._release(len(self._text)), []
            return "", []
        calls, end = parsed
        trailing = self._text[self._start + end :]
        return (trailing if trailing.strip() else ""), self._new(calls)

    def _release(self, upto: int) -> str:
        out = self._text[self._sent : upto]
        self._sent = max(self._sent, upto)
        return out

    def _new(self, calls: list[ToolCall]) -> list[ToolCall]:
        new = calls[self._calls :]
        self._calls = max(self._calls, len(calls))
        return new

    def _held(self, text: str) -> int:
        # a tail that could grow into the start marker (or, for llama3_json, leading whitespace)
        start = self.parser.start
        for n in range(min(len(start) - 1, len(text)), 0, -1):
            if start.startswith(text[-n:]):
                return n
        if isinstance(self.parser, Llama3JsonParser) and text.strip() == "":
            return len(text)
        return 0
