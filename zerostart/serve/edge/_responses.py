"""The body of ``POST /v1/responses`` (OpenAI's Responses API), typed as strictly as the chat
body it becomes (``"stream": "yes"`` and ``"temperature": "0.5"`` are 400s naming the field, as on
every route). What it means for a replica is the gateway's translation
(``serve/gateway/_responses.py``).

    input              a string, or items: messages (roles user, system, developer, assistant;
                       content as text or input_text/output_text parts), function_call,
                       function_call_output
    instructions       a system message first (not carried over from a previous response)
    tools              function tools ({"type": "function", "name", "parameters"}); other tool
                       types are refused
    text.format        text, json_object or json_schema (structured output)
    metadata           at most 16 pairs of strings, keys up to 64 characters, values up to 512
                       (OpenAI's bounds)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from zerostart.serve.edge._parse import FieldError, OpenAIBody
from zerostart.serve.edge._schema import SEED_MAX, SEED_MIN, RequestBody

METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's bounds on metadata
_TEXT_PARTS = ("input_text", "output_text", "text")


class TextPart(OpenAIBody):
    """A part of a message's content: text only (the engine serves text models)."""

    type: str
    text: str = ""

    @model_validator(mode="after")
    def _text_only(self) -> "TextPart":
        if self.type not in _TEXT_PARTS:
            raise ValueError(f"part type {self.type!r} is not supported (text only: {', '.join(_TEXT_PARTS)})")
        return self


class MessageItem(OpenAIBody):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(OpenAIBody):
    """A call the model made earlier (sent back with its output to continue)."""

    type: Literal["function_call"]
    call_id: str | None = None  # None: one is made up
    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text of an object, as OpenAI sends it


class FunctionCallOutputItem(OpenAIBody):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Union[str, list[Any], dict[str, Any]]  # not text: sent to the model as JSON


def _item_type(item: Any) -> str | None:
    """An input item's type; a message may leave it out (OpenAI's "easy input message")."""
    if isinstance(item, dict):
        kind = item.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(item, "type", None)


InputItem = Annotated[
    Union[Annotated[MessageItem, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
          Annotated[FunctionCallOutputItem, Tag("function_call_output")]],
    Discriminator(_item_type, custom_error_type="item_type",
                  custom_error_message="type is not supported (message, function_call, function_call_output)")]


class FunctionTool(OpenAIBody):
    type: str
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _function_only(self) -> "FunctionTool":
        if self.type != "function":
            raise ValueError(f"tool type {self.type!r} is not supported (function tools only)")
        return self


class NamedTool(OpenAIBody):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(OpenAIBody):
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextOptions(OpenAIBody):
    format: TextFormat = TextFormat()


class ResponsesRequest(RequestBody):
    input: Union[str, list[InputItem]]
    instructions: str | None = None
    tools: list[FunctionTool] = []
    tool_choice: Union[Literal["none", "auto", "required"], NamedTool] = "auto"
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = None
    store: bool = True
    text: TextOptions = TextOptions()
    metadata: dict[str, str] | None = None
    truncation: Literal["disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if len(metadata) > METADATA_PAIRS:
            raise ValueError(f"at most {METADATA_PAIRS} pairs, got {len(metadata)}")
        for k, v in metadata.items():
            if len(k) > METADATA_KEY_CHARS:
                raise ValueError(f"key {k[:METADATA_KEY_CHARS]!r}...: keys are at most {METADATA_KEY_CHARS} "
                                 f"characters, this one has {len(k)}")
            if len(v) > METADATA_VALUE_CHARS:
                raise ValueError(f"{k!r}: values are at most {METADATA_VALUE_CHARS} characters, this one has {len(v)}")
        return metadata

    @model_validator(mode="after")
    def _check(self) -> "ResponsesRequest":
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise FieldError("reasoning", "not supported by this server (its models do not reason separately)")
        if self.include:
            raise FieldError("include", f"{self.include[0]!r} is not supported by this server")
        if isinstance(self.input, str) and not self.input:
            raise FieldError("input", "must not be empty")
        return self
