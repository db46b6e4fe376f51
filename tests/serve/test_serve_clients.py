"""The real clients against a real gateway on loopback with the real SmolLM2-135M-Instruct:
the openai SDK (logprobs against transformers, tools, json_schema, embeddings, Responses),
langchain-openai (``with_structured_output`` in its three methods, ``bind_tools`` with a tool
round trip) and litellm (tools, embeddings). SmolLM2 served as an embedding model (last-token
pooling) is checked against transformers' final hidden states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.serve._helpers import Gateway

pytestmark = pytest.mark.slow

WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def gw(smollm2_dir: str, tmp_path_factory: pytest.TempPathFactory):
    # float32, as the transformers reference the logprob and embedding tests compare with
    small = {"idle_timeout": 600, "kv_cache_bytes": "192MiB", "max_model_len": 2048, "images": "off",
             "dtype": "float32"}
    g = Gateway({"models": [{"path": smollm2_dir, "name": "smol", **small},
                            {"path": smollm2_dir, "name": "smol-embed", "embedding": {"pooling": "last"}, **small}]},
                str(tmp_path_factory.mktemp("gw")))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def hf(smollm2_dir: str):
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir), model


# -- openai ---------------------------------------------------------------------------------


def test_openai_chat_logprobs_match_transformers(gw: Gateway, hf) -> None:
    import torch

    tok, model = hf
    r = gw.openai().chat.completions.create(model="smol", messages=ASK, max_tokens=12, temperature=0, logprobs=True,
                                            top_logprobs=2)
    prompt = tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    out = tok(r.choices[0].message.content, add_special_tokens=False)["input_ids"]
    ids = prompt + out
    with torch.no_grad():
        table = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    got = [e.logprob for e in r.choices[0].logprobs.content][: len(out)]
    want = [table[len(prompt) - 1 + i, t].item() for i, t in enumerate(out)]
    assert len(got) == len(out) and max(abs(a - b) for a, b in zip(got, want)) < 1e-3


def test_openai_tools_required_and_auto(gw: Gateway) -> None:
    client = gw.openai()
    # one call (parallel_tool_calls false): the grammar ends the output after it
    r = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=60, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    # parallel calls allowed: SmolLM2 at temperature 0 repeats its call until max_tokens; every
    # whole call is parsed and the cut-off one stays as text (nothing it wrote is lost)
    r = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=60, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" and "city" in json.loads(c.function.arguments)
                         for c in calls)
    assert r.choices[0].finish_reason == "tool_calls" or (
        r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("<tool_call>"))
    auto = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0)
    m = auto.choices[0].message  # the model decides: either shape is valid, and nothing it wrote is lost
    assert (m.tool_calls and m.tool_calls[0].function.name == "get_weather") or m.content


def test_openai_json_schema_parse(gw: Gateway) -> None:
    from pydantic import BaseModel, Field

    class City(BaseModel):  # bounded: unbounded, SmolLM2 writes digits until max_tokens (the grammar allows it)
        name: str = Field(max_length=40)
        country: str = Field(max_length=40)
        population_millions: int = Field(ge=0, le=1000)

    r = gw.openai().chat.completions.parse(model="smol", response_format=City, max_tokens=80, temperature=0,
                                           messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name and r.choices[0].finish_reason == "stop"


def test_openai_embeddings_match_transformers_last_hidden_state(gw: Gateway, hf) -> None:
    import torch

    tok, model = hf
    texts = ["zerostart scales to zero", "and comes back fast"]
    r = gw.openai().embeddings.create(model="smol-embed", input=texts)
    for text, d in zip(texts, r.data):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            last = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        want = last / last.norm()
        torch.testing.assert_close(torch.tensor(d.embedding), want, atol=1e-4, rtol=1e-3)
    short = gw.openai().embeddings.create(model="smol-embed", input=texts[0], dimensions=64)
    assert len(short.data[0].embedding) == 64


def test_openai_responses(gw: Gateway) -> None:
    client = gw.openai()
    first = client.responses.create(model="smol", instructions="Answer in one short sentence.",
                                    input="What is the capital of France?", max_output_tokens=30, temperature=0)
    assert "Paris" in first.output_text
    events = list(client.responses.create(model="smol", input="And of Italy?", previous_response_id=first.id,
                                          max_output_tokens=30, temperature=0, stream=True))
    done = events[-1]
    assert done.type in ("response.completed", "response.incomplete")
    assert "Rome" in done.response.output_text
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    called = client.responses.create(model="smol", input="Weather in Paris?", tools=[tool], tool_choice="required",
                                     max_output_tokens=60, temperature=0)
    call = next(o for o in called.output if o.type == "function_call")
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)


# -- langchain-openai -----------------------------------------------------------------------


def _chat(gw: Gateway):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="smol", base_url=gw.url + "/v1", api_key="none", temperature=0, max_tokens=80,
                      max_retries=0)


def test_langchain_with_structured_output_three_methods(gw: Gateway) -> None:
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        """An answer to a question."""

        answer: str = Field(description="the answer")
        confident: bool = Field(description="whether you are sure")

    question = 'What is the capital of France? Answer in JSON, as {"answer": "...", "confident": true}.'
    llm = _chat(gw)
    by_schema = llm.with_structured_output(Answer).invoke(question)  # method json_schema, the default
    assert isinstance(by_schema, Answer) and by_schema.answer
    by_tool = llm.with_structured_output(Answer, method="function_calling").invoke(question)
    assert isinstance(by_tool, Answer) and by_tool.answer
    # json_mode promises JSON, not the schema (the prompt carries it): a dict comes back
    as_json = llm.with_structured_output(Answer.model_json_schema(), method="json_mode").invoke(question)
    assert isinstance(as_json, dict)


def test_langchain_bind_tools_round_trip(gw: Gateway) -> None:
    from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"It is 18 C and sunny in {city}."

    # strict: the arguments' schema gets additionalProperties false (else SmolLM2 fills the call
    # with made-up keys, which a schema without it allows, until max_tokens)
    llm = _chat(gw).bind_tools([get_weather], tool_choice="get_weather", strict=True)
    messages: list[BaseMessage] = [HumanMessage("What is the weather like in Paris today?")]
    ai = llm.invoke(messages)
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    messages += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = _chat(gw).bind_tools([get_weather]).invoke(messages)
    assert isinstance(final.content, str) and (final.content or final.tool_calls)


# -- litellm --------------------------------------------------------------------------------

# A litellm user's script, run in its own process: litellm 1.110.2 keeps an event loop and client
# connections of its own open for the life of the process (freed only at exit), which this
# process's strict warnings would count against whichever test runs last.
_LITELLM = """
import json, sys
import litellm

base, ask, weather = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
r = litellm.completion(model="openai/smol", api_base=base, api_key="none", messages=ask, tools=[weather],
                       tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60,
                       temperature=0)
e = litellm.embedding(model="openai/smol-embed", api_base=base, api_key="none", input=["hello", "world"])
print(json.dumps({"calls": [[c.function.name, c.function.arguments] for c in r.choices[0].message.tool_calls],
                  "embeddings": [len(d["embedding"]) for d in e.data]}))
"""


@pytest.mark.timeout(900)  # two cold starts (chat, then embeddings) inside it; litellm's import is slow
def test_litellm_tools_and_embeddings(gw: Gateway, hf) -> None:
    pytest.importorskip("litellm")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # else it fetches a cost map at import
    run = subprocess.run([sys.executable, "-c", _LITELLM, gw.url + "/v1", json.dumps(ASK), json.dumps(WEATHER)],
                         env=env, capture_output=True, text=True, timeout=840)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    ((name, arguments),) = got["calls"]
    assert name == "get_weather" and "city" in json.loads(arguments)
    assert got["embeddings"] == [hf[1].config.hidden_size] * 2
