"""OpenAI's Responses API over any replica's chat completions: the translation.

The gateway turns ``POST /v1/responses`` (its body: the edge's ``ResponsesRequest``) into a chat
completion request for the model's replica (zerostart, vLLM or any OpenAI server alike) and the
chat answer, whole or streamed, back into a Response object or its stream of events.
``previous_response_id`` continues a conversation kept in the gateway's store
(``_responses_store.py``), so it survives the model scaling to zero.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from zerostart.serve.edge import (FunctionCallItem, FunctionCallOutputItem, InputItem, MessageItem, NamedTool,
                                  ResponsesRequest)

_CHAT_FIELDS = ("temperature", "top_p", "seed", "user")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request -> chat ----------------------------------------------------------------------

def input_messages(items: str | list[InputItem]) -> list[dict[str, Any]]:
    """Responses input items as chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": "system" if item.role == "developer" else item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id or _new_id("call"), "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            assert isinstance(item, FunctionCallOutputItem)
            output = item.output
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": output if isinstance(output, str) else json.dumps(output)})
    return out


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
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                           "parameters": t.parameters or {"type": "object", "properties": {}}}}
                         for t in req.tools]
        choice = req.tool_choice
        body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if isinstance(choice, NamedTool)
                               else choice)
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
        "max_output_tokens": req.max_output_tokens,
        "tool_choice": req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedTool) else req.tool_choice,
        "tools": [t.model_dump(exclude_none=True) for t in req.tools],
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
