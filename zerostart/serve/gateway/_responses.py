"""OpenAI's Responses API over any replica's chat completions, with a bounded store.

The gateway turns ``POST /v1/responses`` into a chat completion request for the model's
replica (zerostart, vLLM or any OpenAI server alike) and the chat answer, whole or streamed,
back into a Response object or its stream of events. ``previous_response_id`` continues a
conversation kept in the gateway's store (so it survives the model scaling to zero); the store
holds at most ``max_items`` responses for at most ``ttl_s`` seconds, oldest first out
(``server.responses_store`` in the config).

    input              a string, or items: messages (roles user, system, developer, assistant;
                       content as text or input_text/output_text parts), function_call,
                       function_call_output
    instructions       a system message first (not carried over from a previous response)
    tools              function tools ({"type": "function", "name", "parameters"}); other tool
                       types are refused
    text.format        text, json_object or json_schema (structured output)
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_CHAT_FIELDS = ("temperature", "top_p", "seed", "user")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat = TextFormat()


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    store: bool = True
    text: TextOptions = TextOptions()
    metadata: dict[str, str] | None = None
    truncation: Literal["disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check(self) -> "ResponsesRequest":
        for i, t in enumerate(self.tools):
            if t.get("type") != "function":
                raise ValueError(f"tools[{i}]: tool type {t.get('type')!r} is not supported (function tools only)")
            FunctionTool.model_validate(t)
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise ValueError("reasoning: not supported by this server (its models do not reason separately)")
        if self.include:
            raise ValueError(f"include: {self.include[0]!r} is not supported by this server")
        if isinstance(self.input, str) and not self.input:
            raise ValueError("input: must not be empty")
        return self

    def function_tools(self) -> list[FunctionTool]:
        return [FunctionTool.model_validate(t) for t in self.tools]


class Stored(BaseModel):
    response: dict[str, Any]
    messages: list[dict[str, Any]]  # the conversation up to and including this response's output
    at: float


class ResponseStore:
    """The last ``max_items`` responses for ``ttl_s`` seconds (oldest evicted first). In memory,
    in the gateway: a restart forgets them."""

    def __init__(self, max_items: int, ttl_s: float) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        self._expire()
        self._items[response["id"]] = Stored(response=response, messages=messages, at=time.monotonic())
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        self._expire()
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def _expire(self) -> None:
        limit = time.monotonic() - self.ttl_s
        while self._items and next(iter(self._items.values())).at < limit:
            self._items.popitem(last=False)


# -- request -> chat ----------------------------------------------------------------------

def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items as chat messages (ValueError naming the bad item)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ValueError(f"input[{i}].role: {role!r} is not one of user, system, developer, assistant")
            out.append({"role": "system" if role == "developer" else role, "content": _text(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or _new_id("call"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise ValueError(f"input[{i}].type: {kind!r} is not supported (message, function_call, function_call_output)")
    return out


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"input[{i}].content must be text or a list of text parts")
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"input[{i}].content: part type {kind!r} is not supported (text only)")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def chat_request(req: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the chat completion body for the replica, the conversation without instructions)."""
    conversation = history + input_messages(req.input)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    for name in _CHAT_FIELDS:
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    tools = req.function_tools()
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                           "parameters": t.parameters or {"type": "object", "properties": {}}}}
                         for t in tools]
        choice = req.tool_choice
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        body["tool_choice"] = choice
        body["parallel_tool_calls"] = req.parallel_tool_calls
    fmt = req.text.format
    if fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": bool(fmt.strict)}}
    return body, conversation


# -- chat -> response ---------------------------------------------------------------------

def response_object(req: ResponsesRequest, rid: str, created: int, status: str,
                    output: list[dict[str, Any]], usage: dict[str, Any] | None,
                    finish_reason: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": req.model,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if finish_reason == "length" else None,
        "instructions": req.instructions, "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id, "temperature": req.temperature, "top_p": req.top_p,
        "max_output_tokens": req.max_output_tokens, "tool_choice": req.tool_choice, "tools": req.tools,
        "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}, "truncation": "disabled",
        "store": req.store, "usage": None}
    if usage is not None:
        p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        body["usage"] = {"input_tokens": p, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": c,
                         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + c}
    return body


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": _new_id("fc"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if status == "completed" else "", "status": status}



def from_chat(req: ResponsesRequest, chat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Response for a whole chat completion, the assistant message to remember)."""
    choice = chat["choices"][0]
    msg = choice["message"]
    output: list[dict[str, Any]] = []
    if msg.get("content"):
        output.append(message_item(_new_id("msg"), msg["content"]))
    for call in msg.get("tool_calls") or []:
        output.append(call_item(call))
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    body = response_object(req, _new_id("resp"), int(time.time()), status, output, chat.get("usage"),
                           choice.get("finish_reason"))
    remembered = {"role": "assistant", "content": msg.get("content")}
    if msg.get("tool_calls"):
        remembered["tool_calls"] = msg["tool_calls"]
    return body, remembered


class EventStream:
    """Chat completion chunks in, Responses events out (``event: <type>`` SSE frames)."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.req = req
        self.rid = _new_id("resp")
        self.created = int(time.time())
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self._msg: dict[str, Any] | None = None  # the open message item
        self._text: list[str] = []  # the open message's text
        self._all_text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> chat call being built
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    def start(self) -> list[bytes]:
        body = response_object(self.req, self.rid, self.created, "in_progress", [], None)
        return [self._event("response.created", response=body), self._event("response.in_progress", response=body)]

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._open_message()
                assert self._msg is not None  # just opened
                self._text.append(delta["content"])
                out.append(self._event("response.output_text.delta", item_id=self._msg["id"],
                                       output_index=len(self.output), content_index=0, delta=delta["content"],
                                       logprobs=[]))
            for tc in delta.get("tool_calls") or []:
                out += self._close_message()
                call = self._calls.setdefault(tc.get("index", 0), {"id": tc.get("id") or _new_id("call"),
                                                                   "type": "function",
                                                                   "function": {"name": "", "arguments": ""}})
                fn = tc.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def finish(self) -> tuple[list[bytes], dict[str, Any], dict[str, Any]]:
        """(the closing events, the Response, the assistant message to remember)."""
        out = self._close_message()
        calls = [self._calls[i] for i in sorted(self._calls)]
        for call in calls:
            item = call_item(call)
            idx = len(self.output)
            out.append(self._event("response.output_item.added", output_index=idx, item={**item, "arguments": "",
                                                                                         "status": "in_progress"}))
            out.append(self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=idx,
                                   delta=item["arguments"]))
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                                   arguments=item["arguments"]))
            out.append(self._event("response.output_item.done", output_index=idx, item=item))
            self.output.append(item)
        status = "incomplete" if self.finish_reason == "length" else "completed"
        body = response_object(self.req, self.rid, self.created, status, self.output, self.usage, self.finish_reason)
        out.append(self._event("response.incomplete" if status == "incomplete" else "response.completed", response=body))
        remembered: dict[str, Any] = {"role": "assistant", "content": "".join(self._all_text) or None}
        if calls:
            remembered["tool_calls"] = calls
        return out, body, remembered

    def _open_message(self) -> list[bytes]:
        if self._msg is not None:
            return []
        self._msg = message_item(_new_id("msg"), "", status="in_progress")
        idx = len(self.output)
        part = {"type": "output_text", "text": "", "annotations": []}
        return [self._event("response.output_item.added", output_index=idx, item=self._msg),
                self._event("response.content_part.added", item_id=self._msg["id"], output_index=idx,
                            content_index=0, part=part)]

    def _close_message(self) -> list[bytes]:
        if self._msg is None:
            return []
        text = "".join(self._text)
        self._all_text.append(text)
        self._text = []
        idx = len(self.output)
        item = message_item(self._msg["id"], text)
        part = item["content"][0]
        self._msg = None
        self.output.append(item)
        return [self._event("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=idx, item=item)]

    def fail(self, message: str, code: str = "server_error") -> list[bytes]:
        """The stream ends in an error (the replica failed mid-answer): ``error``, then ``response.failed``."""
        body = response_object(self.req, self.rid, self.created, "failed", self.output, self.usage)
        body["error"] = {"code": code, "message": message}
        return [self._event("error", code=code, message=message, param=None),
                self._event("response.failed", response=body)]
