"""The real vLLM (CPU build, ``make vllm-env``) behind the gateway, serving SmolLM2-135M:
held requests during its cold start, one start, answers identical through the gateway and
straight from vLLM, its phases and memory in status, the KV cache sized from the model's share,
idle scale-to-zero (parking refused on CPU, with the reason), a restart, and a crash that
leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from tests.serve._helpers import Gateway, dump, pid_alive, worker_token
from zerostart.serve.backends import _measure

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(2400)]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# vLLM's default loader's greedy answer to QUESTION (vLLM 0.32 CPU, SmolLM2-135M-Instruct bf16)
DEFAULT_LOADER_ANSWER = "The capital of France is Paris."
BUDGET = 6 << 30


def chat(n: int, gw: Gateway) -> list:
    return asyncio.run(_chat(n, gw))


def client_for(gw: Gateway, connections: int = 100):
    """An async OpenAI client that waits as long as vLLM's cold start takes here (minutes)."""
    import openai

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=connections), timeout=900)
    # openai annotates its own httpx2 client; it takes an httpx one too (openai._httpx2)
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0,
                              http_client=http)  # type: ignore[arg-type]


async def _chat(n: int, gw: Gateway) -> list:
    client = client_for(gw, n)
    try:
        return await asyncio.gather(*(client.chat.completions.with_raw_response.create(
            model="smol", messages=QUESTION, max_tokens=16, temperature=0) for _ in range(n)), return_exceptions=True)
    finally:
        await client.close()


def test_vllm_behind_the_gateway(vllm_python, smollm2, tmp_path):
    cfg = {"devices": {"cpu": {"memory_budget": BUDGET}},
           "models": [{"path": smollm2, "name": "smol", "backend": "vllm", "idle_timeout": 30, "park_after": 2,
                       "start_timeout": 900, "max_concurrency": 128, "max_queued": 512,
                       "vllm": {"python": vllm_python, "args": ["--enforce-eager"]}}]}
    gw = Gateway(cfg, str(tmp_path), extra_args=["--log-level", "debug"])
    try:
        m = gw.model("smol")
        assert "Sleep mode is not supported" in m["unavailable_rungs"]["parked"], dump(m)
        assert m["memory_share_bytes"] == BUDGET and m["memory_estimate_source"] == "share"

        # 100 requests while vLLM starts: one start, every one answered, all the same answer
        out = chat(100, gw)
        errors = [r for r in out if isinstance(r, Exception) or r.status_code != 200]
        assert not errors, errors[:3]
        answers = {r.parse().choices[0].message.content for r in out}
        assert answers == {DEFAULT_LOADER_ANSWER}, answers
        assert gw.cold_starts("smol") == 1

        m = gw.model("smol")
        phases = {p["name"]: p for p in m["last_cold_start"]["phases"]}
        assert {"import", "device_init", "read", "warmup", "server_init", "first_token"} <= set(phases), dump(m)
        assert phases["read"]["detail"]["zerostart_gb"] > 0.2  # loaded through --load-format zerostart (auto)
        assert m["memory_estimate_source"] == "measured" and m["memory_estimate_bytes"] > 1 << 30, dump(m)
        # the KV cache came from the share: BUDGET - runtime_bytes - weights
        kv_gib = (BUDGET - 2_400_000_000 - 269_030_016) / (1 << 30)
        assert any(f"Explicitly set ({kv_gib:.2f}/" in line for line in gw.log), gw.tail()
        for phase in ("import", "read", "warmup", "first_token"):
            assert gw.phase_count("smol", phase) == 1

        # straight to vLLM: it answers only with the gateway's secret, and the same answer
        address = m["workers"][0]["address"]
        body = {"model": "smol", "messages": QUESTION, "max_tokens": 16, "temperature": 0}
        assert httpx.post(address + "/v1/chat/completions", timeout=120, json=body).status_code == 401
        token = worker_token(m["workers"][0]["pid"], "VLLM_API_KEY")
        direct = httpx.post(address + "/v1/chat/completions", timeout=120, json=body,
                            headers={"authorization": f"Bearer {token}"})
        assert direct.json()["choices"][0]["message"]["content"] == DEFAULT_LOADER_ANSWER

        # idle: it cannot park on CPU (park_after is skipped), so it stops at idle_timeout
        tree = _measure.process_tree(m["workers"][0]["pid"])
        assert len(tree) >= 3, tree  # API server, engine core, worker
        gw.wait_for("idle scale-to-zero", lambda: gw.model("smol")["state"] == "zero", timeout=120)
        assert gw.metric("zerostart_parks_total", model="smol", reason="idle") == 0
        assert gw.metric("zerostart_replica_stops_total", model="smol", reason="idle") == 1
        gw.wait_for("vLLM's processes to go", lambda: not any(pid_alive(p) for p in tree), timeout=60)

        # the next request starts it again
        (again,) = chat(1, gw)
        assert again.parse().choices[0].message.content == DEFAULT_LOADER_ANSWER and gw.cold_starts("smol") == 2

        # a crash: the API server killed while a request runs; its engine processes go too
        pid = gw.model("smol")["workers"][0]["pid"]
        tree = _measure.process_tree(pid)

        async def crash():
            client = client_for(gw)
            try:
                long = asyncio.create_task(client.chat.completions.with_raw_response.create(
                    model="smol", messages=QUESTION, max_tokens=4000, extra_body={"ignore_eos": True}))
                await asyncio.sleep(3.0)
                os.kill(pid, signal.SIGKILL)
                return await asyncio.gather(long, return_exceptions=True)
            finally:
                await client.close()

        (result,) = asyncio.run(crash())
        assert isinstance(result, Exception) or result.status_code >= 500, result
        gw.wait_for("the crash to be noticed", lambda: gw.model("smol")["state"] == "zero", timeout=60)
        gw.wait_for("no orphaned vLLM process", lambda: not any(pid_alive(p) for p in tree), timeout=60)
        assert gw.metric("zerostart_worker_crashes_total", model="smol") == 1
        (after,) = chat(1, gw)
        assert after.parse().choices[0].message.content == DEFAULT_LOADER_ANSWER and gw.cold_starts("smol") == 3
    finally:
        gw.stop()
