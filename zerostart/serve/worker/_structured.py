"""What a chat request's ``tools``, ``tool_choice`` and ``response_format`` ask of the engine.

    tool_choice "none"        the tools are not shown to the model; nothing is parsed
    tool_choice "auto"        the tools go to the chat template; calls are parsed from the output
    tool_choice "required"    the output is forced to be one or more calls (one unless
                              parallel_tool_calls), in the model's own format, by a grammar
    tool_choice {function}    forced to be exactly one call of that function
    response_format           json_object / json_schema: the output is forced to match
                              (json_schema's ``strict`` changes nothing: the grammar always is)

A forced tool call and a forced response format together are refused (one grammar per
request), naming both fields.

A grammar is compiled by :class:`Grammars`, on threads of its own, never on the worker's event
loop (a schema of thousands of properties takes seconds, during which every other stream on
the loop would stall and the gateway's probe go unanswered), within a budget: at most
``server.max_grammar_bytes`` of schema or grammar text, and ``server.grammar_timeout`` seconds
(a 400 naming the limit past either). A compile that outlives its request's budget runs to its
end on its thread (llguidance cannot be interrupted) and is kept for the next request with the
same grammar; one still queued is dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from zerostart.engine import Constraint, EngineError, ToolCall, ToolParser
from zerostart.serve._config import ServerConfig
from zerostart.serve.edge import BadRequest, ChatCompletionRequest, ResponseFormat

if TYPE_CHECKING:
    from zerostart.engine import Engine

# Grammars compiled at once: compiles release the GIL and each takes a core, beside the engine's
_COMPILE_THREADS = max(2, min(8, (os.cpu_count() or 2) // 2))


@dataclass
class Plan:
    tools: list[dict] | None  # for the chat template
    parser: ToolParser | None  # parse the output for calls
    constraint: Constraint | None
    keep_special_tokens: bool
    param: str = "response_format"  # the request field the constraint comes from (named in its errors)


def tool_choice_name(choice: Any) -> str | None:
    """"none" | "auto" | "required" | a function's name (None when the value is malformed)."""
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
            return fn["name"]
    return None


def plan(parser: ToolParser, tools: list[dict] | None, tool_choice: Any, parallel: bool,
         response_format: dict | None) -> Plan:
    choice = tool_choice_name("auto" if tool_choice is None else tool_choice)
    if choice is None:
        raise BadRequest('tool_choice must be "none", "auto", "required" or {"type": "function", '
                         '"function": {"name": ...}}', param="tool_choice")
    tools = tools or None
    if tools is None and choice not in ("none", "auto"):
        raise BadRequest(f"tool_choice {choice!r} needs tools", param="tool_choice")
    constraint = _format_constraint(response_format)
    if tools is None or choice == "none":
        return Plan(None, None, constraint, False)
    if choice == "auto":
        return Plan(tools, parser, constraint, parser.keeps_special_tokens)
    if constraint is not None:
        raise BadRequest("response_format and a forced tool_choice cannot be combined (one grammar per request)",
                         param="response_format")
    try:
        lark = parser.grammar(tools, choice, parallel=parallel)
    except EngineError as e:
        raise BadRequest(str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None
    return Plan(tools, parser, Constraint("lark", lark), parser.keeps_special_tokens, param="tools")


def _format_constraint(fmt: dict | None) -> Constraint | None:
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format json_schema needs json_schema.schema (an object)", param="response_format")
        return Constraint("json_schema", schema)
    raise BadRequest(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                     param="response_format")


def chat_plan(parser: ToolParser, req: ChatCompletionRequest) -> Plan:
    """:func:`plan` for a validated chat request."""
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel) else req.tool_choice
    fmt = req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None
    return plan(parser, req.tool_dicts(), choice, req.parallel_tool_calls, fmt)


def format_constraint(fmt: ResponseFormat | None) -> Constraint | None:
    """A completion request's response_format (no tools there)."""
    return _format_constraint(fmt.model_dump(by_alias=True, exclude_none=True) if fmt else None)


def call_json(call: ToolCall) -> dict[str, Any]:
    """A parsed call in OpenAI's message shape."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


@dataclass(frozen=True)
class GrammarBudget:
    """What compiling one request's grammar may cost (the gateway's ``server`` settings)."""

    timeout: float = ServerConfig.model_fields["grammar_timeout"].default  # seconds, from the request's view
    max_bytes: int = ServerConfig.model_fields["max_grammar_bytes"].default  # schema JSON / grammar text, UTF-8


class Grammars:
    """Compiles the grammars of one engine's requests on threads, within a :class:`GrammarBudget`."""

    def __init__(self, engine: Engine, budget: GrammarBudget) -> None:
        self._engine, self.budget = engine, budget
        self._pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="zerostart-grammar")
        self._busy = 0  # compiles queued or running
        self._lock = threading.Lock()

    async def compile(self, constraint: Constraint | None, param: str) -> None:
        """Compile ``constraint`` (kept by the engine, so that submitting it only copies the
        result); a BadRequest naming ``param`` when it is invalid or past the budget."""
        if constraint is None:
            return
        with self._lock:
            others = self._busy
            self._busy += 1
        job = self._pool.submit(self._compile, constraint)
        job.add_done_callback(self._done)
        try:
            # a job not yet started when this gives up (its budget spent, its client gone) is dropped
            await asyncio.wait_for(asyncio.wrap_future(job), self.budget.timeout)
        except TimeoutError:
            queued = f"; {others} other grammar(s) were compiling when it arrived" if others else ""
            raise BadRequest(f"{param}: its grammar did not compile within {self.budget.timeout:g} s, this server's "
                             f"budget (server.grammar_timeout){queued}. Simplify it (fewer properties, alternatives, "
                             "patterns) or ask the operator for a larger budget", param=param,
                             code="grammar_too_complex") from None
        except _TooLarge as e:
            raise BadRequest(f"{param}: its grammar is {e.size} bytes, more than this server compiles "
                             f"({self.budget.max_bytes} bytes, server.max_grammar_bytes)", param=param,
                             code="grammar_too_large") from None
        except EngineError as e:
            raise BadRequest(f"{param}: {e}", param=param) from None

    def _done(self, _: object) -> None:
        with self._lock:
            self._busy -= 1

    def _compile(self, constraint: Constraint) -> None:  # on a compile thread
        spec = constraint.spec
        text = spec if isinstance(spec, str) else json.dumps(spec, separators=(",", ":"), ensure_ascii=False)
        size = len(text.encode())
        if size > self.budget.max_bytes:
            raise _TooLarge(size)
        self._engine.grammar().compile(constraint)

    def close(self) -> None:
        """Drop queued compiles; running ones end on their own (they cannot be interrupted)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size
