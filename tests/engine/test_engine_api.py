"""The engine's public API: generate, submit/handles from threads and asyncio, cancel, stop, errors."""

import asyncio
import threading

import pytest

from zerostart.engine import Engine, EngineConfig, EngineError, SamplingParams, TokenEvent

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = ["Hello world", "The model", "One two three four five six seven", "a", "cold start fast", "b c d"]


def _ids(engine, prompt, params=GREEDY):
    return [ev.token_id for ev in engine.generate(prompt, params)]


def test_public_names():
    import zerostart.engine as eng

    assert sorted(eng.__all__) == ["Constraint", "Engine", "EngineConfig", "EngineError", "PoolingParams",
                                   "RequestHandle", "SamplingParams", "TOOL_PARSERS", "TokenEvent", "TokenLogprob", "TokenText",
                                   "Tokenizer", "ToolCall", "ToolParser", "available_cpus", "cpu_kernels", "device_for", "quant_kernels",
                                   "render_chat", "tool_parser", "weights_dtype"]
    for name in eng.__all__:
        assert getattr(eng, name) is not None


def test_engine_attributes(tiny_engine, tiny_dir):
    e = tiny_engine
    assert e.model_name == "tiny"
    assert e.max_model_len == 1024  # the demo's max_position_embeddings
    assert str(e.device) == "cpu"
    phases = [p.name for p in e.timeline.phases]
    for name in ("import", "device_init", "read", "prepare", "warmup"):
        assert name in phases
    # weights and KV cache are each one allocation that every tensor views
    w = e.weights_storage.untyped_storage().data_ptr()
    assert e.kv_storage.numel() == e.kv_storage.untyped_storage().nbytes() // e.kv_storage.element_size()
    for t in e.kv.k + e.kv.v:
        assert t.untyped_storage().data_ptr() == e.kv_storage.untyped_storage().data_ptr()
    assert w != 0


def test_generate_events(tiny_engine):
    evs = list(tiny_engine.generate("Hello world", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)))
    assert len(evs) == 5 and all(isinstance(ev, TokenEvent) for ev in evs)
    assert [ev.completion_tokens for ev in evs] == [1, 2, 3, 4, 5]
    assert all(ev.finish_reason is None for ev in evs[:-1]) and evs[-1].finish_reason == "length"
    prompt_len = len(tiny_engine.tokenizer.encode("Hello world"))
    assert {ev.prompt_tokens for ev in evs} == {prompt_len}
    text = "".join(ev.text for ev in evs)
    assert text == tiny_engine.tokenizer.decode([ev.token_id for ev in evs], skip_special_tokens=True)


def test_concurrent_submit_matches_one_at_a_time(tiny_engine):
    # more requests than slots (4): some wait for a slot, all must equal their solo run
    ref = {p: _ids(tiny_engine, p) for p in PROMPTS}
    tiny_engine.start()
    try:
        handles = {p: tiny_engine.submit(tiny_engine.tokenizer.encode(p), GREEDY) for p in PROMPTS}
        got: dict[str, list] = {}
        threads = [threading.Thread(target=lambda p=p, h=h: got.__setitem__(p, [ev.token_id for ev in h]))
                   for p, h in handles.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert got == ref
        # generate() on a started engine goes through the loop
        assert _ids(tiny_engine, PROMPTS[0]) == ref[PROMPTS[0]]
    finally:
        tiny_engine.stop()


def test_async_iteration(tiny_engine):
    ref = _ids(tiny_engine, "Hello world")
    tiny_engine.start()
    try:
        async def main():
            hs = [tiny_engine.submit(tiny_engine.tokenizer.encode(p), GREEDY) for p in ("Hello world", "The model")]

            async def collect(h):
                return [ev.token_id async for ev in h.aiter()]

            return await asyncio.gather(*(collect(h) for h in hs))

        a, b = asyncio.run(main())
        assert a == ref and len(b) == 24
    finally:
        tiny_engine.stop()


def test_waiting_for_the_end_wakes_the_loop_once(tiny_engine, monkeypatch):
    """``ended()`` (a non-streamed answer) is woken once, at the last event, not at each; every
    event is still there to iterate after."""
    ref = _ids(tiny_engine, "Hello world")
    tiny_engine.start()
    try:
        async def main():
            loop = asyncio.get_running_loop()
            wakes = 0
            threadsafe = loop.call_soon_threadsafe

            def counted(*args):
                nonlocal wakes
                wakes += 1
                return threadsafe(*args)

            monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
            h = tiny_engine.submit(tiny_engine.tokenizer.encode("Hello world"), GREEDY)
            await h.ended()
            assert h.finished
            return [ev.token_id for ev in h], wakes

        ids, wakes = asyncio.run(main())
        assert ids == ref and wakes <= 1
    finally:
        tiny_engine.stop()


def test_cancel_frees_the_slot(tiny_engine):
    tiny_engine.start()
    try:
        h = tiny_engine.submit([1, 2, 3], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        it = iter(h)
        first = next(it)
        assert first.finish_reason is None
        h.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "abort" and rest[-1].token_id is None
        assert rest[-1].completion_tokens < 500
        # every slot is free again: a full batch runs
        hs = [tiny_engine.submit([5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
              for _ in range(tiny_engine.num_slots)]
        assert all([ev.finish_reason for ev in h2][-1] == "length" for h2 in hs)
    finally:
        tiny_engine.stop()


def test_stop_aborts_in_flight(tiny_dir):
    e = Engine.from_pretrained(tiny_dir, config=EngineConfig(max_num_seqs=1))
    h1 = e.submit([1, 2], SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
    h2 = e.submit([3, 4], SamplingParams(max_tokens=10, temperature=0))  # waits: one slot
    assert e.stats() == {"running": 0, "waiting": 2, "slots": 1}
    e.step()
    assert e.stats() == {"running": 1, "waiting": 1, "slots": 1}
    e.start()
    next(iter(h1))
    e.stop()
    assert [ev.finish_reason for ev in h1][-1] == "abort"
    assert [ev.finish_reason for ev in h2][-1] == "abort"


def test_abandoned_generate_releases_its_slot(tiny_dir):
    e = Engine.from_pretrained(tiny_dir, config=EngineConfig(max_num_seqs=1))
    gen = e.generate("Hello", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    next(gen)
    gen.close()
    assert not e.scheduler.running and not e.scheduler.waiting
    assert len(list(e.generate("Hello", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))) == 3


@pytest.mark.parametrize("bad, field", [
    (dict(max_tokens=-1), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(seed="x"), "seed"),
    (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(max_tokens=True), "max_tokens"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_sampling_params_validation_names_the_field(bad, field):
    with pytest.raises(EngineError, match=field):
        SamplingParams(**bad)


def test_engine_config_validation_names_the_field():
    with pytest.raises(EngineError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(EngineError, match="fuse"):
        EngineConfig(fuse="sometimes")
    with pytest.raises(EngineError, match="kv_cache_bytes"):
        EngineConfig(kv_cache_bytes=-5)
    with pytest.raises(EngineError, match="kv_dtype must be one of auto, float32, bfloat16, float16"):
        EngineConfig(kv_dtype="fp8")  # type: ignore[arg-type]  # what a caller without a type checker may pass


def test_bad_requests(tiny_engine):
    with pytest.raises(EngineError, match="empty"):
        tiny_engine.submit([], GREEDY)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        tiny_engine.submit([10**6], GREEDY)
    with pytest.raises(EngineError, match="max_model_len"):
        tiny_engine.submit([1] * tiny_engine.max_model_len, GREEDY)
    with pytest.raises(EngineError, match="token ids"):
        tiny_engine.submit("text", GREEDY)


def test_length_clipped_to_context(tiny_dir):
    e = Engine.from_pretrained(tiny_dir, config=EngineConfig(max_model_len=16, max_num_seqs=1))
    evs = list(e.generate([1] * 10, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)))
    assert len(evs) == 6 and evs[-1].finish_reason == "length"


def test_load_errors(tmp_path, tiny_dir):
    with pytest.raises(EngineError, match="not a model directory"):
        Engine.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="config.json"):
        Engine.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(EngineError, match="cuda|device"):
        Engine.from_pretrained(tiny_dir, device="tpu")


def test_light_names_do_not_import_torch(child_env):
    import subprocess
    import sys

    code = ("import sys; from zerostart.engine import SamplingParams, TokenEvent, EngineConfig, EngineError; "
            "SamplingParams(max_tokens=3); assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env, timeout=60)
    assert r.returncode == 0, r.stderr


def test_token_event_to_dict():
    ev = TokenEvent(5, "hi", "stop", 3, 2)
    assert ev.to_dict() == {"token_id": 5, "text": "hi", "finish_reason": "stop", "prompt_tokens": 3,
                            "completion_tokens": 2}


def test_checkpoint_mismatches_name_the_tensor(tmp_path, tiny_dir):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(EngineError, match="'model.norm.weight' is missing"):
        Engine.from_pretrained(str(bad))
    shutil.copy(f"{tiny_dir}/model.safetensors", bad / "model.safetensors")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="gate_proj.weight' has shape"):
        Engine.from_pretrained(str(bad))
