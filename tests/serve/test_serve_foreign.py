"""Foreign engines behind the gateway: any OpenAI server from a command template (here another
zerostart worker, a real foreign process: the gateway only knows its command line and health
route), and SGLang's protocol (a stand-in that speaks its routes and log lines; the real SGLang
does not run on this CPU machine). The real vLLM is in tests/serve/test_serve_vllm.py (marker
``vllm``)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from tests.serve._helpers import Gateway, dump, pid_alive
from zerostart.serve.backends import _measure

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def foreign_worker(model: str, **extra) -> dict:
    return {"path": model, "name": "foreign", "backend": "command", "max_concurrency": 16, "start_timeout": 120,
            "command": {"run": [sys.executable, "-m", "zerostart.serve.worker", "--model", "{model}", "--name", "{name}",
                                "--host", "{host}", "--port", "{port}"],
                        "ready_path": "/zerostart/ready?wait=0"}, **extra}


def server_pid(gw: Gateway, name: str) -> int:
    pids = [w["pid"] for w in gw.model(name)["workers"] if w["pid"]]
    assert len(pids) == 1, gw.model(name)
    return pids[0]


def test_command_backend_holds_requests_measures_memory_and_scales_to_zero(tiny_model, tmp_path):
    gw = Gateway({"models": [foreign_worker(tiny_model, idle_timeout=4)]}, str(tmp_path))
    try:
        out = asyncio.run(gw.burst(30, clients=5, model="foreign", prompt="hello", max_tokens=4))
        assert all(not isinstance(r, Exception) and r.status_code == 200 for r in out), out
        assert gw.cold_starts("foreign") == 1  # thirty requests during the cold start: one start
        m = gw.model("foreign")
        assert m["backend"] == "command" and m["state"] == "hot"
        assert set(m["unavailable_rungs"]) == {"parked", "image"}, dump(m)  # CPU: nothing to park; no images
        assert "cannot park" in m["unavailable_rungs"]["parked"]
        assert m["memory_estimate_source"] == "measured" and m["memory_estimate_bytes"] > 50 << 20, dump(m)
        names = [p["name"] for p in m["last_cold_start"]["phases"]]
        assert names[0] == "start" and "first_token" in names, names
        pid = server_pid(gw, "foreign")
        assert _measure.host_bytes(_measure.process_tree(pid)) > 0
        gw.wait_for("idle scale-to-zero", lambda: gw.model("foreign")["state"] == "zero", timeout=60)
        assert not pid_alive(pid)
        assert gw.metric("zerostart_replica_stops_total", model="foreign", reason="idle") == 1
        r = gw.openai().completions.create(model="foreign", prompt="again", max_tokens=2)  # restarts
        assert r.choices[0].text is not None and gw.cold_starts("foreign") == 2
    finally:
        gw.stop()


def test_command_backend_crash_fails_the_request_in_flight_and_restarts(tiny_model, tmp_path):
    gw = Gateway({"models": [foreign_worker(tiny_model)]}, str(tmp_path))
    try:
        gw.openai().completions.create(model="foreign", prompt="warm", max_tokens=1)
        pid = server_pid(gw, "foreign")

        async def crash_during_a_request():
            client = gw.async_openai()
            try:
                long = asyncio.create_task(client.completions.with_raw_response.create(
                    model="foreign", prompt="x", max_tokens=2000, extra_body={"ignore_eos": True}))
                await asyncio.sleep(1.0)
                os.kill(pid, signal.SIGKILL)
                return await asyncio.gather(long, return_exceptions=True)
            finally:
                await client.close()

        (result,) = asyncio.run(crash_during_a_request())
        assert isinstance(result, Exception), result  # an error, not a hang or a truncated success
        gw.wait_for("the crash to be noticed", lambda: gw.model("foreign")["state"] == "zero")
        assert gw.metric("zerostart_worker_crashes_total", model="foreign") == 1
        r = gw.openai().completions.create(model="foreign", prompt="after", max_tokens=2)
        assert r.choices and gw.cold_starts("foreign") == 2 and server_pid(gw, "foreign") != pid
    finally:
        gw.stop()


def sglang_model(model: str, device: str, **extra) -> dict:
    return {"path": model, "name": f"sg-{device.split(':')[0]}", "backend": "sglang", "device": device,
            "sglang": {"python": sys.executable, "module": "tests.serve._sglang_standin"},
            "env": {"STANDIN_LOAD_S": "0.5"}, **extra}


def test_sglang_protocol_start_phases_park_and_wake(tiny_model, tmp_path):
    # "cuda:0" makes the backend use SGLang's CUDA path (memory saver, release/resume); the
    # stand-in does not touch a GPU, and on this machine nvidia-smi reports no memory.
    gw = Gateway({"models": [sglang_model(tiny_model, "cuda:0", park_after=1, idle_timeout=120),
                             sglang_model(tiny_model, "cpu")]}, str(tmp_path))
    try:
        cpu = gw.model("sg-cpu")
        assert "memory saver" in cpu["unavailable_rungs"]["parked"] and not cpu["parkable"], dump(cpu)
        r = gw.openai().chat.completions.create(model="sg-cuda", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4)
        assert len(r.choices[0].message.content.split()) == 4
        m = gw.model("sg-cuda")
        names = [p["name"] for p in m["last_cold_start"]["phases"]]
        assert names[:6] == ["import", "device_init", "read", "prepare", "warmup", "server_init"], names
        read = next(p for p in m["last_cold_start"]["phases"] if p["name"] == "read")
        # Lines are timestamped as they reach the gateway, whose loop may take the first marker
        # late on a loaded machine; the 0.5 s load still dwarfs every other stand-in phase.
        assert read["detail"]["load_s"] == 0.5 and read["seconds"] >= 0.25, read
        gw.wait_for("parking after park_after", lambda: gw.model("sg-cuda")["state"] == "parked", timeout=30)
        assert gw.metric("zerostart_parks_total", model="sg-cuda", reason="idle") == 1
        r = gw.openai().chat.completions.create(model="sg-cuda", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4)
        assert r.choices[0].message.content  # served after resume_memory_occupation
        assert gw.cold_starts("sg-cuda", rung="parked") == 1 and gw.cold_starts("sg-cuda", rung="source") == 1
        wake = gw.model("sg-cuda")["last_cold_start"]["phases"][0]
        assert wake["name"] == "wake" and "resume_memory_occupation" in wake["detail"]["how"]
    finally:
        gw.stop()
