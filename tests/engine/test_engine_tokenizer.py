"""Tokenizer and chat templates against transformers; streaming detokenization and stop strings."""

import random

import pytest

from zerostart.engine import EngineError
from zerostart.engine._detok import Detokenizer
from zerostart.engine._tokenizer import Tokenizer

# Templates in the styles model families use (written for these tests): each exercises other
# parts of the template language that transformers supports.
CHATML_TOOLS = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- 'You may call these tools:\\n' }}
{%- for tool in tools %}{{- tool | tojson + '\\n' }}{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and (tools or not loop.first) %}{% continue %}{% endif %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.content is defined %}{{- message.content }}{%- endif %}
{%- if message.tool_calls is defined %}
{%- for call in message.tool_calls %}
{{- '\\n<tool_call>' + call.function | tojson(indent=2) + '</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

INST_ALTERNATING = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = none %}
    {%- set rest = messages %}
{%- endif %}
{%- for message in rest %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system is not none %}
            {{- '[INST] ' + system + '\\n\\n' + message['content'] | trim + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] | trim + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- endif %}
{%- endfor %}
"""

NAMESPACE_THINKING = """{%- set ns = namespace(last_user=-1, turns=0) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- set ns.turns = ns.turns + 1 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
<|{{ m.role }}|>
{% if m.role == 'assistant' and m.reasoning_content is defined and loop.index0 > ns.last_user %}
<think>{{ m.reasoning_content | trim }}</think>
{% endif %}
{% generation %}{{ m.content }}{% endgeneration %}
{% if not loop.last %}<|end|>{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|assistant|>
{%- if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{%- endif %}
{{- '\\n(turns: ' ~ ns.turns ~ ', ' ~ dict(a=1)|length ~ ')' }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, wörld 🙂"},
     {"role": "assistant", "content": "Hey."}, {"role": "user", "content": "  What is 2+2?  "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "think b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning_content": "think d",
                                        "tool_calls": None}],
    [{"role": "user", "content": "first"}, {"role": "user", "content": "second, out of turn"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <b>now</b>",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def toks(tiny_dir, hf_tiny):
    return Tokenizer(tiny_dir), hf_tiny[1]


@pytest.mark.parametrize("template", [None, CHATML_TOOLS, INST_ALTERNATING, NAMESPACE_THINKING],
                         ids=["demo-llama3", "chatml-tools", "inst-alternating", "namespace-thinking"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_equals_transformers(toks, template, conv, gen):
    ours, hf = toks
    messages = CONVERSATIONS[conv]
    kwargs = {"chat_template": template} if template else {}
    try:
        expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs)
    except Exception as e:  # the template itself raised (role alternation): we must raise too
        assert template is INST_ALTERNATING and conv == 3 and "alternate" in str(e)
        with pytest.raises(EngineError, match="alternate"):
            ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs)
        return
    assert not (template is INST_ALTERNATING and conv == 3)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs) == expected
    ids = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, **kwargs)
    assert ids == hf(expected, add_special_tokens=False).input_ids


def test_chat_template_tools_and_variables(toks):
    ours, hf = toks
    messages = CONVERSATIONS[1]
    for kwargs in ({"tools": TOOLS}, {"enable_thinking": False}):
        for template in (CHATML_TOOLS, NAMESPACE_THINKING):
            expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=True, **kwargs)
            assert ours.apply_chat_template(messages, chat_template=template, **kwargs) == expected


def test_continue_final_message(toks):
    ours, hf = toks
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, I am"}]
    expected = hf.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True) == expected
    assert expected.endswith("Hi, I am")


def test_chat_template_errors(toks):
    ours, _ = toks
    with pytest.raises(EngineError, match="non-empty list"):
        ours.apply_chat_template([])
    with pytest.raises(EngineError, match="syntax error"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(EngineError):  # the sandbox refuses to reach into Python internals
        ours.apply_chat_template([{"role": "user", "content": "x"}],
                                 chat_template="{{ messages.__class__.__mro__ }}")


def test_encode_decode_equal_transformers(toks):
    ours, hf = toks
    for text in ["Hello world", "", "héllo wörld 日本語 🙂 tabs\tand\nnewlines", "<|eot_id|> special inside"]:
        assert ours.encode(text) == hf(text).input_ids
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_id == hf.eos_token_id and ours.bos_token_id == hf.bos_token_id


def _stream(tok, ids, stop=()):
    d = Detokenizer(tok, stop)
    parts = []
    for i in ids:
        parts.append(d.add(i))
        if d.stopped:
            break
    if not d.stopped:
        parts.append(d.finish())
    return parts, d


def test_streaming_detokenization_is_utf8_safe(toks):
    ours, _ = toks
    rng = random.Random(0)
    texts = ["héllo wörld 日本語 🙂🙃 ok", "ßøå — “quotes” …", "plain words only"]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False)
        assert len(ids) > len(text.split())  # multi-byte characters are split across tokens
        parts, _ = _stream(ours, ids)
        assert "".join(parts) == text
        assert all("\ufffd" not in p for p in parts)
    for _ in range(200):  # random tokens, special ones included: deltas add up to the full decode
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 30))]
        parts, _ = _stream(ours, ids)
        assert "".join(parts) == ours.decode(ids, skip_special_tokens=True)


def test_stop_strings_are_cut_and_never_emitted(toks):
    ours, _ = toks
    text = "one two three four five"
    ids = ours.encode(text, add_special_tokens=False)
    for stop, expected in [(["three"], "one two "), (["o t"], "one tw"), (["e f", "two"], "one "),
                           (["absent"], text), (["five"], "one two three four "), (["one"], "")]:
        parts, d = _stream(ours, ids, stop)
        assert "".join(parts) == expected, stop
        assert d.stopped == (stop != ["absent"])
    # a held-back prefix of a stop string is released once it cannot be one
    parts, d = _stream(ours, ids, ["two threx"])
    assert "".join(parts) == text and not d.stopped


def test_template_sources(tmp_path, tiny_dir):
    import json
    import shutil

    shutil.copy(f"{tiny_dir}/tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|eot_id|>", "special": True}, "bos_token": "<|begin_of_text|>",
        "chat_template": [{"name": "default", "template": "A{{ messages[0].content }}"},
                          {"name": "tool_use", "template": "T{{ tools | length }}"}]}))
    tok = Tokenizer(str(tmp_path))
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "Ax"
    assert tok.apply_chat_template(msgs, tools=[{"a": 1}]) == "T1"
    assert tok.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "T0"
    assert tok.eos_token_id == tok.token_to_id("<|eot_id|>")
    (tmp_path / "chat_template.jinja").write_text("J{{ bos_token }}")  # a template file wins
    assert Tokenizer(str(tmp_path)).apply_chat_template(msgs) == "J<|begin_of_text|>"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(EngineError, match="no chat template"):
        Tokenizer(str(tmp_path)).apply_chat_template(msgs)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(EngineError, match="tokenizer.json"):
        Tokenizer(str(tmp_path))
