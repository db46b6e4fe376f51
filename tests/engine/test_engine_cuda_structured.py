"""CUDA: grammar masks applied on the device (with and without decode CUDA graphs), logprobs
and prompt logprobs against the CPU engine, embeddings. Run on a machine with a GPU:
``python -m pytest tests/engine -m gpu``."""

import json

import pytest
import torch

from zerostart.engine import Constraint, Engine, EngineConfig, PoolingParams, SamplingParams

pytestmark = pytest.mark.gpu
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}


def _run(engine, prompts, params):
    handles = [engine.submit(engine.tokenizer.encode(p), params[i % len(params)]) for i, p in enumerate(prompts)]
    while any(not h.finished for h in handles):
        engine.step()
    return [list(h) for h in handles]


@pytest.mark.parametrize("graphs", [False, True])
def test_constrained_and_free_rows_on_cuda(tiny_dir, graphs):
    cpu = Engine.from_pretrained(tiny_dir, device="cpu", dtype="float32", config=EngineConfig(max_num_seqs=4))
    gpu = Engine.from_pretrained(tiny_dir, device="cuda", dtype="float32",
                                 config=EngineConfig(max_num_seqs=4, cuda_graphs=graphs))
    params = [SamplingParams(max_tokens=60, temperature=0, constraint=Constraint("json_schema", SCHEMA)),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3)]
    prompts = ["JSON:", "Hello there", "More JSON", "free text"]
    on_cpu, on_gpu = _run(cpu, prompts, params), _run(gpu, prompts, params)
    for i, (a, b) in enumerate(zip(on_cpu, on_gpu)):
        assert [e.token_id for e in a] == [e.token_id for e in b]
        if i % 2 == 0:
            jsonschema.validate(json.loads("".join(e.text for e in b)), SCHEMA)
        else:
            got = torch.tensor([e.logprob.logprob for e in b])
            ref = torch.tensor([e.logprob.logprob for e in a])
            torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def test_prompt_logprobs_and_embeddings_on_cuda(tiny_dir):
    cpu = Engine.from_pretrained(tiny_dir, device="cpu", dtype="float32", config=EngineConfig(max_num_seqs=2, prefill_chunk=5))
    gpu = Engine.from_pretrained(tiny_dir, device="cuda", dtype="float32",
                                 config=EngineConfig(max_num_seqs=2, prefill_chunk=5))
    ids = cpu.tokenizer.encode("one two three four five six seven eight nine ten")
    for e in (cpu, gpu):
        h = e.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=2))
        while not h.finished:
            e.step()
        e.plp = [p.logprob for p in list(h)[0].prompt_logprobs[1:]]
        h = e.submit(ids, PoolingParams("mean"))
        while not h.finished:
            e.step()
        e.emb = list(h)[0].embedding
    torch.testing.assert_close(torch.tensor(gpu.plp), torch.tensor(cpu.plp), atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(gpu.emb), torch.tensor(cpu.emb), atol=1e-4, rtol=1e-3)
