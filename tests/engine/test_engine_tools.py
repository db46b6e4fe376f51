"""Tool calls: the three output formats parsed whole and streamed, chat templates rendering
tools and tool messages (the model's own tool syntax, or the Hermes fallback), and grammars
that force calls whose arguments validate against each tool's schema."""

import json
from typing import Any

import pytest

from zerostart.engine import Constraint, SamplingParams
from zerostart.engine._chat import render_chat
from zerostart.engine._toolcalls import tool_parser

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "maximum": 99},
                                                                    "b": {"type": "integer", "maximum": 99}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
TOOLS: list[dict[str, Any]] = [WEATHER, ADD]

# (format, text with two calls and some content first)
OUTPUTS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}; '
                   '{"name": "add", "parameters": {"a": 1, "b": 2}}',
    "mistral": 'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, '
               '{"name": "add", "arguments": {"a": 1, "b": 2}}]',
}
EXPECTED = [("get_weather", {"city": "Oslo", "unit": "c"}), ("add", {"a": 1, "b": 2})]


@pytest.fixture(scope="module")
def tok(tiny_engine):
    return tiny_engine.tokenizer


@pytest.mark.parametrize("fmt", sorted(OUTPUTS))
def test_parse_whole_output(tok, fmt):
    content, calls = tool_parser(fmt, tok).parse(OUTPUTS[fmt])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == EXPECTED
    assert content == (None if fmt == "llama3_json" else "Let me check.")
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_parse_newer_mistral_and_string_arguments(tok):
    p = tool_parser("mistral", tok, template="... [TOOL_CALLS] ... [ARGS] ...")
    _, calls = p.parse('[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "unit": "c"}')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == EXPECTED[::-1]
    _, calls = tool_parser("hermes", tok).parse('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    assert json.loads(calls[0].arguments) == {"a": 1, "b": 2}


@pytest.mark.parametrize("fmt, text", [
    ("hermes", "<tool_call>\n{not json}\n</tool_call>"), ("hermes", "no calls here"),
    ("llama3_json", '{"answer": 42} is not a call'), ("mistral", "[TOOL_CALLS] oops"),
])
def test_what_does_not_parse_stays_text(tok, fmt, text):
    assert tool_parser(fmt, tok).parse(text) == (text, [])


@pytest.mark.parametrize("fmt", sorted(OUTPUTS))
@pytest.mark.parametrize("step", [1, 3, 17])
def test_streamed_parse_equals_whole_parse(tok, fmt, step):
    text = OUTPUTS[fmt]
    stream = tool_parser(fmt, tok).stream()
    content, calls = "", []
    for i in range(0, len(text), step):
        c, k = stream.feed(text[i : i + step])
        content += c
        calls += k
    c, k = stream.finish()
    content += c
    calls += k
    whole_content, whole_calls = tool_parser(fmt, tok).parse(text)
    assert content.strip() == (whole_content or "")
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


def test_streamed_hermes_calls_arrive_as_each_closes(tok):
    stream = tool_parser("hermes", tok).stream()
    first, second = OUTPUTS["hermes"].split("</tool_call>\n", 1)
    _, calls = stream.feed(first + "</tool_call>\n")
    assert [c.name for c in calls] == ["get_weather"]
    _, calls = stream.feed(second)
    assert [c.name for c in calls] == ["add"]
    assert stream.finish() == ("", [])


def test_streamed_plain_text_is_not_held(tok):
    stream = tool_parser("hermes", tok).stream()
    assert stream.feed("Hello <tool") == ("Hello ", [])  # the tail could start a call
    assert stream.feed("box> world") == ("<toolbox> world", [])
    assert stream.finish() == ("", [])


HERMES_TEMPLATE = (
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nTOOLS:{% for t in tools %}{{ t.function.name }};"
    "{% endfor %}<|eot_id|>{% endif %}"
    "{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{%- elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>"
    "{%- else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
]


def test_template_with_tool_syntax_gets_tools_and_argument_objects(tok):
    text = render_chat(tok, CONVERSATION, tools=TOOLS, chat_template=HERMES_TEMPLATE)
    assert "TOOLS:get_weather;add;" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>' in text
    assert "<|start_header_id|>tool<|end_header_id|><tool_response>12 C</tool_response>" in text


def test_template_without_tools_gets_the_hermes_fallback(tok):
    # the tiny model's template never reads `tools`
    text = render_chat(tok, [{"role": "system", "content": "Be brief."}, *CONVERSATION], tools=TOOLS)
    system = text.split("<|eot_id|>")[0]
    assert "Be brief." in system and "<tools>" in system and json.dumps(WEATHER) in system
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>' in text
    # both results in one user turn, so roles still alternate
    assert ("<|start_header_id|>user<|end_header_id|>\n\n<tool_response>\n12 C\n</tool_response>\n"
            "<tool_response>\nrain\n</tool_response><|eot_id|>") in text
    assert tool_parser(None, tok, tok.get_chat_template()).name == "hermes"


def test_parser_picked_from_the_template(tok):
    assert tool_parser(None, tok, "{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert tool_parser(None, tok, "<|python_tag|>").name == "llama3_json"
    assert tool_parser(None, tok, "<tool_call>").name == "hermes"


def test_special_token_markers_are_tokens_in_grammars(tok):
    p = tool_parser("hermes", tok)
    eot = tok.token_to_id("<|eot_id|>")
    assert p._lit("<|eot_id|>") == f"<[{eot}]>" and p._lit("<tool_call>") == '"<tool_call>"'


@pytest.mark.parametrize("fmt", sorted(OUTPUTS))
def test_required_grammar_accepts_parallel_calls(tiny_engine, fmt):
    parser = tool_parser(fmt, tiny_engine.tokenizer)
    calls_text = OUTPUTS[fmt].removeprefix("Let me check.").lstrip()
    ids = tiny_engine.tokenizer.encode(calls_text, add_special_tokens=False)
    grammar = tiny_engine.grammar()
    for parallel, ok in ((True, True), (False, False)):
        m = grammar.matcher(Constraint("lark", parser.grammar(TOOLS, "required", parallel=parallel)))
        accepted = m.m.try_consume_tokens(ids) == len(ids) and m.m.is_accepting()
        assert accepted == ok, (fmt, parallel)


@pytest.mark.parametrize("fmt", sorted(OUTPUTS))
@pytest.mark.parametrize("choice", ["required", "add"])
def test_grammar_forces_valid_calls(tiny_engine, fmt, choice):
    parser = tool_parser(fmt, tiny_engine.tokenizer)
    lark = parser.grammar(TOOLS, choice, parallel=False)  # one call: a random model would chain them forever
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in (1, 2):
        evs = list(tiny_engine.generate("Call a tool:", SamplingParams(
            max_tokens=200, temperature=1.0, seed=seed, constraint=Constraint("lark", lark))))
        text = "".join(ev.text for ev in evs)
        assert evs[-1].finish_reason == "stop", text
        content, calls = parser.parse(text)
        assert calls and content is None, text
        if choice != "required":
            assert [c.name for c in calls] == [choice]
        for c in calls:
            jsonschema.validate(json.loads(c.arguments), schemas[c.name])
