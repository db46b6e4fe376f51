"""Logprobs through a real gateway and worker with the real openai client: chat (whole and
streamed), completions with echo (max_tokens 0 scores a prompt, as lm-eval asks), against the
engine's own logits in this process; the new sampling fields accepted or refused by name."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.serve._helpers import Gateway


@pytest.fixture(scope="module")
def gw(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    g = Gateway({"models": [{"path": tiny_model, "name": "lp", "idle_timeout": 120}]},
                str(tmp_path_factory.mktemp("gw")))
    yield g
    g.stop()


def _lp(ref, ids):
    return ref.logits(ids).log_softmax(-1)


def test_chat_logprobs_whole_and_streamed(gw: Gateway, ref) -> None:
    client = gw.openai()
    msgs = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="lp", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    # the same request in this process: same tokens, the same logprobs (engine parity with transformers
    # is tests/engine/test_engine_logprobs.py)
    from zerostart.engine import SamplingParams, TokenText

    prompt = ref.tokenizer.apply_chat_template(msgs, tokenize=True)
    evs = list(ref.generate(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=3)))
    text_of = TokenText(ref.tokenizer)
    assert [e.token for e in content] == [text_of(ev.token_id)[0] for ev in evs]
    table = _lp(ref, prompt + [ev.token_id for ev in evs])
    for i, (e, ev) in enumerate(zip(content, evs)):
        assert abs(e.logprob - table[len(prompt) - 1 + i, ev.token_id].item()) < 1e-4
        assert [t.token for t in e.top_logprobs] == [text_of(t)[0] for t, _ in ev.logprob.top]
        assert bytes(e.bytes) == text_of(ev.token_id)[1]
    stream = client.chat.completions.create(model="lp", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    assert all(c.usage is not None for c in chunks)  # continuous usage stats


def test_completion_echo_scores_the_prompt(gw: Gateway, ref) -> None:
    client = gw.openai()
    text = "The cold start is short and the model is fast"
    r = client.completions.create(model="lp", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    ids = ref.tokenizer.encode(text)
    table = _lp(ref, ids)
    assert r.choices[0].text == text and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    got = torch.tensor(lp.token_logprobs[1:])
    torch.testing.assert_close(got, table[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
    assert all(t in top for t, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))  # the chosen token is listed
    # with generation (lm-eval's request: echo, logprobs 1, max_tokens 1): prompt, then one token
    r = client.completions.create(model="lp", prompt=text, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(r.choices[0].logprobs.tokens) == len(ids) + 1


@pytest.mark.parametrize("extra, word", [({"min_tokens": 20, "max_tokens": 4}, "min_tokens"),
                                         ({"repetition_penalty": 0}, "repetition_penalty"),
                                         ({"min_p": 2}, "min_p"), ({"logit_bias": {"1": 5}}, "logit_bias")])
def test_sampling_fields_refused_by_name(gw: Gateway, extra, word) -> None:
    with pytest.raises(openai.BadRequestError, match=word):
        gw.openai().completions.create(model="lp", prompt="x", extra_body=extra)


def test_sampling_fields_accepted(gw: Gateway) -> None:
    r = gw.openai().completions.create(model="lp", prompt="x", max_tokens=6, temperature=0,
                                       extra_body={"min_tokens": 6, "repetition_penalty": 1.3, "min_p": 0.1,
                                                   "ignore_eos": False})
    assert r.usage.completion_tokens == 6
