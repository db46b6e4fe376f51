"""Request bodies against the OpenAI schema (issue 15): fuzzed bodies and bytes parse or get a
400 naming their field, types are strict as OpenAI's, and bodies that once escaped as 500s."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerostart.serve.edge import (BadRequest, ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                                  GenerateRequest, TokenizeRequest, parse_request)

from tests.serve._fuzz import body as _body


def _parses_or_names_the_field(schema: type[GenerateRequest], raw: bytes, sent: Any) -> None:
    try:
        req = parse_request(schema, raw)
    except BadRequest as e:
        assert e.status == 400 and e.message
        if e.param is not None:
            assert isinstance(sent, dict) and e.param in sent or e.param in schema.model_fields, (e.param, sent)
            assert e.message.startswith(e.param), e.message  # the message names the field first
        return
    assert isinstance(req, schema) and isinstance(req.model, str) and req.model
    assert 1 <= req.sequences  # what the gateway's max_sequences is checked against


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body, schema=st.sampled_from([CompletionRequest, ChatCompletionRequest]))
def test_any_body_parses_or_is_a_400_naming_its_field(body: dict[str, Any], schema: type[GenerateRequest]) -> None:
    _parses_or_names_the_field(schema, json.dumps(body).encode(), body)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_parse_or_are_a_400(raw: bytes) -> None:
    for schema in (CompletionRequest, ChatCompletionRequest):
        _parses_or_names_the_field(schema, raw, None)


@pytest.mark.parametrize("raw, says", [
    (b"[" * 100_000, "nested too deeply"),  # a RecursionError in json once escaped as a 500
    (b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),  # > 4300 digits
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "NaN is not a JSON value"),
    (b'{"model": "m", "prompt": "\xff"}', "not valid JSON"),
])
def test_bodies_that_once_escaped_the_parser(raw: bytes, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        parse_request(CompletionRequest, raw)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "3"), ("max_tokens", 3.0), ("max_tokens", True), ("temperature", "0.5"), ("n", 2.0),
    ("stream", "true"), ("stream", 1), ("echo", "yes"), ("seed", "1"), ("top_k", 1.5),
    ("seed", 2**64), ("seed", 2**63), ("seed", -(2**63) - 1),  # OpenAI's range: a signed 64-bit integer
    ("stop", ["x"] * 17), ("stream_options", {"include_usage": "yes"}),
])
def test_types_are_strict_as_openai_s_are(field: str, value: Any) -> None:
    """OpenAI answers 400 where a lax parser would coerce: "3" is not an integer, 2.0 is not
    one either, "true" is not a boolean; seeds are 64-bit."""
    with pytest.raises(BadRequest) as e:
        parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "x", field: value}).encode())
    assert e.value.param == field and e.value.message.startswith(field)


def test_what_strict_types_still_accept() -> None:
    ok = parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": ["a", "b"], "temperature": 1, "n": 3,
                                                      "seed": -(2**63), "top_p": 1, "stop": ["x"] * 16}).encode())
    assert ok.temperature == 1.0 and ok.seed == -(2**63) and ok.sequences == 6


@pytest.mark.parametrize("schema, body, param", [
    (CompletionRequest, {"logit_bias": {"50256": -100}}, "logit_bias"),
    (CompletionRequest, {"suffix": "end"}, "suffix"),
    (CompletionRequest, {"best_of": 3}, "best_of"),
    (CompletionRequest, {"max_tokens": 0}, "max_tokens"),
    (ChatCompletionRequest, {"top_logprobs": 2}, "top_logprobs"),
    (ChatCompletionRequest, {"tool_choice": "required"}, "tool_choice"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    (EmbeddingRequest, {"input": "x", "stream": True}, "stream"),
    (TokenizeRequest, {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
])
def test_checks_of_the_whole_body_name_their_field(schema: type[Any], body: dict[str, Any], param: str) -> None:
    """A check that needs several fields (a model validator) still says which one is wrong, as
    ``param`` and first in the message (``"param": null`` once)."""
    base: dict[str, Any] = {"model": "m"}
    if schema is CompletionRequest:
        base["prompt"] = "x"
    elif schema is ChatCompletionRequest:
        base["messages"] = [{"role": "user", "content": "x"}]
    with pytest.raises(BadRequest) as e:
        parse_request(schema, json.dumps({**base, **body}).encode())
    assert e.value.param == param and e.value.message.startswith(param), e.value.message
