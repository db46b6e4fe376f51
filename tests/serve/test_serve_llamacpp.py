"""The real llama.cpp ``llama-server`` (``make llamacpp-env``) behind the gateway, serving
SmolLM2-135M-Instruct's Q4_1 GGUF: 50 requests at zero answered by one start, greedy answers the
same as a llama-server started by hand with the same flags, its secret in neither ``ps`` nor its
environment, its phases, memory and metrics in status, idle scale-to-zero and a restart from the
page cache (rung ``image``) or from disk (``source``) in the response headers, 429 past the queue,
a clear 400 before any start for what it lacks, SIGKILL mid-stream, an embedding server, and a
memory budget shared with zerostart's own engine."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import httpx
import openai
import pytest

from tests.serve._helpers import Gateway, dump, pid_alive
from zerostart import weights

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = dict(model="smol", messages=QUESTION, max_tokens=16, temperature=0)


def model_entry(llama_server: str, gguf: str, **kw) -> dict:
    return {"path": gguf, "name": "smol", "backend": "llamacpp", "idle_timeout": 60, "start_timeout": 120,
            "llamacpp": {"server": llama_server}, **kw}


def gateway(tmp_path, *models: dict, budget: int | None = None) -> Gateway:
    cfg: dict = {"server": {"worker_probe_timeout": 2}, "models": list(models)}
    if budget is not None:
        cfg["devices"] = {"cpu": {"memory_budget": budget}}
    return Gateway(cfg, str(tmp_path), extra_args=["--log-level", "debug"])


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


class Direct:
    """llama-server started by hand with a worker's own flags (its key and port left out)."""

    def __init__(self, argv: list[str]) -> None:
        import socket

        args, i = [], 0
        while i < len(argv):
            if argv[i] in ("--api-key-file", "--port"):
                i += 2
                continue
            args.append(argv[i])
            i += 1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(args + ["--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.close()
        raise AssertionError("llama-server started by hand did not become ready")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def test_llamacpp_behind_the_gateway(llama_server, smollm2_gguf, tmp_path):
    gw = gateway(tmp_path, model_entry(llama_server, smollm2_gguf, idle_timeout=8))
    try:
        m = gw.model("smol")
        assert "SIGSTOP frees nothing" in m["unavailable_rungs"]["parked"] and "image" not in m["unavailable_rungs"]

        # a request llama-server cannot serve as asked: 400 at once, nothing started
        with pytest.raises(openai.BadRequestError, match="echo: not supported"):
            gw.openai().completions.create(model="smol", prompt="x", echo=True, logprobs=1, max_tokens=1)
        assert gw.model("smol")["state"] == "zero" and gw.cold_starts("smol") == 0

        # 50 requests at zero: one start, every one answered
        out = asyncio.run(gw.burst(50, model="smol", prompt="Once upon a time", max_tokens=16, temperature=0))
        errors = [r for r in out if isinstance(r, Exception) or r.status_code != 200]
        assert not errors, errors[:3]
        assert all(r.parse().choices[0].text for r in out)
        assert gw.cold_starts("smol") == 1
        m = gw.model("smol")
        phases = {p["name"]: p for p in m["last_cold_start"]["phases"]}
        assert ["device_init", "read", "warmup", "server_init", "first_token"] == list(phases), dump(m)
        assert phases["read"]["detail"]["threads"] >= 1 and phases["warmup"]["detail"]["slots"] == 4
        assert m["last_cold_start"]["image"] == {"mode": "off", "path": smollm2_gguf, "status": "is_source"}
        assert m["memory_estimate_source"] == "measured" and 50 << 20 < m["memory_estimate_bytes"] < 2 << 30, dump(m)
        pid = m["workers"][0]["pid"]

        # its own metrics, read at the watchdog's probes, in status under vLLM's names
        def engine_metrics() -> dict:
            return gw.model("smol")["workers"][0].get("engine_metrics", {})

        gw.wait_for("llama.cpp's metrics after the burst",
                    lambda: engine_metrics().get("vllm:generation_tokens_total", 0) >= 16 * 50, timeout=6)
        em = engine_metrics()
        assert em["vllm:prompt_tokens_total"] > 0 and em["vllm:num_requests_running"] == 0, em
        assert em["llamacpp:n_decode_total"] > 0 and em["scraped_unix"] > time.time() - 10, em

        # its secret: in neither its command line nor its environment, and the key file is gone
        argv = cmdline(pid)
        key_file = argv[argv.index("--api-key-file") + 1]
        assert not os.path.exists(key_file)
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
        assert b"ZEROSTART_WORKER_TOKEN" not in environ and b"LLAMA_API_KEY" not in environ
        address = m["workers"][0]["address"]
        assert httpx.post(address + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 401
        assert httpx.get(address + "/health", timeout=10).status_code == 200

        # greedy through the gateway == llama-server started by hand with the same flags
        via = gw.openai().chat.completions.create(**CHAT).choices[0].message.content
        direct = Direct(argv)
        try:
            by_hand = httpx.post(direct.url + "/v1/chat/completions", json=CHAT, timeout=60).json()
        finally:
            direct.close()
        assert via and via == by_hand["choices"][0]["message"]["content"], (via, by_hand)

        # idle: it stops at idle_timeout (no parking on CPU), and comes back from the page cache
        gw.wait_for("idle scale-to-zero", lambda: gw.model("smol")["state"] == "zero", timeout=60)
        gw.wait_for("llama-server to go", lambda: not pid_alive(pid), timeout=30)
        assert gw.metric("zerostart_replica_stops_total", model="smol", reason="idle") == 1
        again = gw.openai().chat.completions.with_raw_response.create(**CHAT)
        assert float(again.headers["x-zerostart-cold-start-ms"]) > 0
        assert again.headers["x-zerostart-cold-start-rung"] == "image", dict(again.headers)
        assert again.parse().choices[0].message.content == via
        assert gw.model("smol")["last_cold_start"]["phases"][0]["detail"]["page_cache_fraction"] > 0.5

        # the GGUF evicted from the page cache while it is at zero: the next start reads the disk
        gw.wait_for("idle scale-to-zero", lambda: gw.model("smol")["state"] == "zero", timeout=60)
        assert weights.evict_page_cache([smollm2_gguf])[0].resident_after < 0.01
        cold = gw.openai().chat.completions.with_raw_response.create(**CHAT)
        assert cold.headers["x-zerostart-cold-start-rung"] == "source", dict(cold.headers)
        assert gw.cold_starts("smol") == 3 and gw.cold_starts("smol", "source") >= 1
    finally:
        gw.stop()


def test_llamacpp_killed_mid_stream_ends_cleanly_and_restarts(llama_server, smollm2_gguf, tmp_path):
    gw = gateway(tmp_path, model_entry(llama_server, smollm2_gguf))
    try:
        stream = gw.openai().completions.create(model="smol", prompt="Once upon a time", max_tokens=4000, stream=True,
                                                temperature=0, extra_body={"ignore_eos": True})
        got, error = [], None
        try:
            for chunk in stream:
                got.append(chunk.choices[0].text)
                if len(got) == 5:
                    os.kill(gw.model("smol")["workers"][0]["pid"], signal.SIGKILL)
        except openai.APIError as e:
            error = e
        assert len(got) >= 5 and error is not None and "exited" in str(error), (len(got), error)
        gw.wait_for("the crash to be noticed", lambda: gw.model("smol")["state"] == "zero", timeout=30)
        assert gw.metric("zerostart_worker_crashes_total", model="smol") == 1
        after = gw.openai().chat.completions.create(**CHAT)
        assert after.choices[0].message.content and gw.cold_starts("smol") == 2
    finally:
        gw.stop()


def test_llamacpp_queue_limit(llama_server, smollm2_gguf, tmp_path):
    gw = gateway(tmp_path, model_entry(llama_server, smollm2_gguf, max_queued=4, max_concurrency=4))
    try:
        out = asyncio.run(gw.burst(20, clients=5, model="smol", prompt="Once upon a time", max_tokens=8,
                                   temperature=0))
        codes = sorted(r.status_code if not isinstance(r, Exception) else getattr(r, "status_code", 0) for r in out)
        assert set(codes) == {200, 429} and codes.count(200) >= 4, codes
        limited = next(r for r in out if isinstance(r, openai.RateLimitError))
        assert int(limited.response.headers["retry-after"]) >= 1
        assert gw.cold_starts("smol") == 1
    finally:
        gw.stop()


def test_llamacpp_embedding_server(llama_server, smollm2_gguf, tmp_path):
    gw = gateway(tmp_path, model_entry(llama_server, smollm2_gguf, name="smol-embed", embedding={"pooling": "mean"}))
    try:
        client = gw.openai()
        r = client.embeddings.create(model="smol-embed", input=["Paris is in France", "Berlin"])
        vectors = [d.embedding for d in r.data]
        assert len(vectors) == 2 and len(vectors[0]) == 576  # SmolLM2-135M's hidden size
        assert all(abs(sum(x * x for x in v) - 1.0) < 1e-3 for v in vectors)  # normalize: true (its default)
        with pytest.raises(openai.BadRequestError, match="is an embedding model"):
            client.chat.completions.create(model="smol-embed", messages=QUESTION, max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="dimensions: not supported"):
            client.embeddings.create(model="smol-embed", input="x", dimensions=8)
    finally:
        gw.stop()


def test_llamacpp_and_zerostart_share_one_memory_budget(llama_server, smollm2_gguf, tmp_path):
    """Two models on one CPU budget that holds one of them at a time: each start moves the other
    (idle) down, whatever its engine."""
    budget, zs = 1000 << 20, 800 << 20
    gw = gateway(tmp_path, model_entry(llama_server, smollm2_gguf, name="llama"),
                 {"path": smollm2_gguf, "name": "zs", "max_model_len": 512, "images": "off",
                  "memory_estimate": zs}, budget=budget)
    try:
        client = gw.openai()
        assert client.chat.completions.create(**{**CHAT, "model": "llama"}).choices[0].message.content
        held = gw.model("llama")["memory_estimate_bytes"]
        assert gw.model("llama")["memory_estimate_source"] == "measured" and held + zs > budget, held
        assert client.chat.completions.create(**{**CHAT, "model": "zs"}).choices[0].message.content
        assert gw.model("llama")["state"] == "zero" and gw.model("zs")["state"] == "hot"
        assert gw.metric("zerostart_replica_stops_total", model="llama", reason="evicted") == 1
        assert client.chat.completions.create(**{**CHAT, "model": "llama"}).choices[0].message.content
        assert gw.model("zs")["state"] == "zero" and gw.model("llama")["state"] == "hot"
        assert gw.metric("zerostart_replica_stops_total", model="zs", reason="evicted") == 1
        reserved = gw.status()["devices"][0]["reserved_bytes"]
        assert reserved <= budget, dump(gw.status())
    finally:
        gw.stop()
