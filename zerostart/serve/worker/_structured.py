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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from zerostart.engine import Constraint, EngineError, ToolCall, ToolParser
from zerostart.serve._errors import BadRequest
from zerostart.serve._openai_schema import ChatCompletionRequest, ResponseFormat


@dataclass
class Plan:
    tools: list[dict] | None  # for the chat template
    parser: ToolParser | None  # parse the output for calls
    constraint: Constraint | None
    keep_special_tokens: bool


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
    return Plan(tools, parser, Constraint("lark", lark), parser.keeps_special_tokens)


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
