"""Typed request bodies of the OpenAI routes, shared by the gateway (which validates before it
starts anything), the cluster's ingress and the workers (which generate from them). Each is an
:class:`~zerostart.serve.edge._parse.OpenAIBody` (strict types) and becomes a request only
through ``parse_request`` (``_parse.py``).

Unknown fields are ignored as OpenAI's SDKs send new ones over time, but fields for features
this server does not have (logit_bias, functions, ...) are refused with a 400 naming them rather
than silently dropped. ``null`` means "the default" for every field.

The shape checks of ``tools``, ``tool_choice`` and ``response_format`` are here (the gateway
refuses a bad one before it starts a model); what they ask of the engine (grammars, the tool
parser) is the worker's (``serve/worker/_structured.py``). Which route takes which body is the
route table's (``_routes.py``).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from zerostart.serve.edge._parse import FieldError, OpenAIBody
from zerostart.units import parse_duration

# Fields whose features this server lacks: refused when set to anything but their "off" value.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "functions": (None, []),  # the deprecated forms of tools and tool_choice
    "function_call": (None, "none", "auto"),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's range for seed (a signed 64-bit integer)
MAX_STOP = 16  # stop strings per request (OpenAI takes 4): each is looked for after every token


class StreamOptions(OpenAIBody):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk


class RequestBody(OpenAIBody):
    """What every routed body has: the model it is for, and Ollama's keep_alive."""

    model: str = Field(min_length=1)
    stream: bool = False
    keep_alive: Union[str, float, int, None] = None  # Ollama's: how long the model stays hot after this request

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, v: Any) -> Any:
        if v is not None:
            parse_duration(v, forever_if_negative=True)
        return v

    @property
    def keep_alive_seconds(self) -> float | None:
        return None if self.keep_alive is None else parse_duration(self.keep_alive, forever_if_negative=True)

    @property
    def sequences(self) -> int:
        """Engine requests this body makes (``server.max_sequences`` bounds it): one here."""
        return 1

    @property
    def sequences_param(self) -> str:
        """The field that sets :attr:`sequences`, for the 400 that says there are too many."""
        return "n"


class JsonSchemaFormat(OpenAIBody):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field("response", min_length=1)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the grammar always holds the output to the schema


class ResponseFormat(OpenAIBody):
    """``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required with type json_schema ({\"name\": ..., \"schema\": {...}})")
        return self

    @property
    def constrained(self) -> bool:
        return self.type != "text"


class GenerateRequest(RequestBody):
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension (vLLM's): 0 or -1 is off
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop_token_ids: list[int] = []  # extension
    ignore_eos: bool = False  # extension
    min_tokens: int = Field(0, ge=0)  # extension (vLLM's)
    repetition_penalty: float = Field(1.0, gt=0.0)  # extension (vLLM's)
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # extension (vLLM's)
    user: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> "GenerateRequest":
        for key, value in (self.model_extra or {}).items():
            if key in _UNSUPPORTED and value not in _UNSUPPORTED[key]:
                raise FieldError(key, "not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "not supported by this server (leave it unset or equal to n)")
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stop)}")
        for s in [stop] if isinstance(stop, str) else stop or []:
            if not s:
                raise ValueError("stop strings must be non-empty")
        return stop

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    # what the engine is asked for: top alternatives per generated / prompt token (None = no logprobs)
    @property
    def token_logprobs(self) -> int | None:
        return None

    @property
    def prompt_logprobs(self) -> int | None:
        return None

    @property
    def sequences(self) -> int:
        """Sequences this request makes the engine generate: its prompts times ``n``."""
        return self.n


class FunctionCall(OpenAIBody):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text of an object, as OpenAI sends it


class MessageToolCall(OpenAIBody):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBody):

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") not in ("text", "refusal") or not isinstance(part.get(part["type"]), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            out.append(part[part["type"]])
        return "".join(out)

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates take it (``engine.render_chat`` makes the tool parts fit)."""
        # chat templates know system/user/assistant/tool; OpenAI's newer "developer" is a system turn
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class FunctionDef(OpenAIBody):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # calls always match their schema here


class Tool(OpenAIBody):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(OpenAIBody):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)


class NamedToolChoice(OpenAIBody):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(GenerateRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto
    parallel_tool_calls: bool = True

    @property
    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _texts(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs set to true")
        for i, m in enumerate(self.messages):
            try:
                m.text()
            except ValueError as e:
                raise FieldError(f"messages[{i}].content", str(e)) from None
        return self

    @model_validator(mode="after")
    def _tools(self) -> "ChatCompletionRequest":
        choice = self.forced_tool
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise FieldError("tools", "function names must be unique")
        if choice is not None and not names:
            raise FieldError("tool_choice", f"{choice!r} needs tools")
        if choice not in (None, "required") and choice not in names:
            raise FieldError("tool_choice", f"function {choice!r} is not among the tools ({', '.join(names)})")
        if choice is not None and self.response_format is not None and self.response_format.constrained:
            raise FieldError("response_format", "cannot be combined with a forced tool_choice (one grammar per request)")
        return self

    @property
    def forced_tool(self) -> str | None:
        """"required", a function's name, or None (tool_choice auto or none)."""
        c = self.tool_choice
        if isinstance(c, NamedToolChoice):
            return c.function.name
        return "required" if c == "required" else None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as OpenAI sends them (what chat templates and the tool parser take)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class CompletionRequest(GenerateRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt, generate nothing

    @model_validator(mode="after")
    def _scoring(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "0 needs echo (scoring a prompt); otherwise at least 1")
        return self

    @property
    def token_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, p: Any) -> Any:
        if isinstance(p, list):
            if not p:
                raise ValueError("must not be empty")
            for x in p:
                if isinstance(x, list) and not x:
                    raise ValueError("token lists must not be empty")
                if isinstance(x, int) and x < 0 or isinstance(x, list) and any(t < 0 for t in x):
                    raise ValueError("token ids must be non-negative")
        return p

    @property
    def max_new_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # 16: OpenAI's default for completions

    @property
    def sequences(self) -> int:
        return len(self.prompts()) * self.n

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]  # all ints (all() does not narrow): one prompt of ids
        return list(p)  # type: ignore[arg-type]  # several prompts: texts or id lists


class EmbeddingRequest(RequestBody):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)  # the first that many values, renormalized
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "EmbeddingRequest":
        if self.stream:
            raise FieldError("stream", "embeddings are not streamed")
        p = self.input
        if isinstance(p, list) and (not p or any(isinstance(x, (list, str)) and not x for x in p)):
            raise FieldError("input", "must not be empty (nor any of its items)")
        if isinstance(p, str) and not p:
            raise FieldError("input", "must not be empty")
        if isinstance(p, list) and any(isinstance(x, int) and x < 0 or isinstance(x, list) and any(t < 0 for t in x)
                                       for x in p):
            raise FieldError("input", "token ids must be non-negative")
        return self

    @property
    def sequences(self) -> int:
        """One engine request per input, batched with every other request's."""
        return len(self.inputs())

    @property
    def sequences_param(self) -> str:
        return "input"

    def inputs(self) -> list[str | list[int]]:
        """One entry per input: text, or token ids."""
        p = self.input
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(RequestBody):
    """vLLM's ``/tokenize``: a ``prompt`` (text) or ``messages`` (a chat, rendered with its template)."""

    model: str | None = None  # type: ignore[assignment]  # None: the server's only model
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages (as vLLM)
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[Tool] | None = None

    @model_validator(mode="after")
    def _one(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "send either prompt (text) or messages (a chat)")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None  # type: ignore[assignment]
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _ids(cls, ids: list[int]) -> list[int]:
        if any(i < 0 for i in ids):
            raise ValueError("token ids must be non-negative")
        return ids
