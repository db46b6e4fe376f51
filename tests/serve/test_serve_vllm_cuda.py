"""vLLM's CUDA paths behind the gateway (markers ``gpu`` and ``vllm``: they need a GPU and a
CUDA build of vLLM in ZEROSTART_VLLM_PYTHON's environment; skipped elsewhere): sleep mode as
the PARKED rung (levels 1 and 2) with the memory checked after every wake, the share sizing
``--gpu-memory-utilization``, and the CUDA checkpoint API parking a vLLM process run as a
plain ``command``."""

from __future__ import annotations

import pytest

from tests.serve._helpers import Gateway, dump
from zerostart.serve.backends import _measure

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(3600)]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def ask(gw: Gateway, name: str) -> str:
    r = gw.openai().chat.completions.create(model=name, messages=QUESTION, max_tokens=16, temperature=0)
    return r.choices[0].message.content


@pytest.mark.parametrize("level", [1, 2])
def test_vllm_sleep_mode_parks_and_wakes_without_growing(vllm_python, smollm2, tmp_path, level):
    gw = Gateway({"models": [{"path": smollm2, "name": "smol", "backend": "vllm", "device": "cuda:0",
                              "park_after": 1, "idle_timeout": 600, "start_timeout": 900,
                              "vllm": {"python": vllm_python, "sleep_level": level, "args": ["--enforce-eager"]}}]},
                 str(tmp_path))
    try:
        first = ask(gw, "smol")
        hot = gw.model("smol")["memory_estimate_bytes"]
        pid = gw.model("smol")["workers"][0]["pid"]
        for cycle in range(5):
            gw.wait_for(f"park {cycle}", lambda: gw.model("smol")["state"] == "parked", timeout=120)
            held = _measure.device_bytes(_measure.process_tree(pid), "cuda:0")
            assert held is not None and held < hot // 2, (cycle, held, hot)  # sleep freed the device memory
            assert ask(gw, "smol") == first  # woken: the same greedy answer
            wake = gw.model("smol")["last_cold_start"]["phases"][0]
            assert wake["name"] == "wake", dump(gw.model("smol"))
            assert wake["detail"]["grew_bytes"] < max(256 << 20, hot // 20), wake  # no sleep/wake leak
        assert gw.cold_starts("smol", rung="parked") == 5 and gw.cold_starts("smol", rung="source") == 1
    finally:
        gw.stop()


def test_two_vllm_models_share_one_gpu_by_default(vllm_python, smollm2, tmp_path):
    models = [{"path": smollm2, "name": n, "backend": "vllm", "device": "cuda:0", "start_timeout": 900,
               "vllm": {"python": vllm_python, "args": ["--enforce-eager"]}} for n in ("a", "b")]
    gw = Gateway({"models": models}, str(tmp_path))
    try:
        assert ask(gw, "a") == ask(gw, "b")  # both hot at once: neither took 90 % of the GPU
        total = _measure.device_total_bytes("cuda:0")
        assert total is not None and gw.model("a")["memory_share_bytes"] == total // 2
        assert gw.model("a")["state"] == gw.model("b")["state"] == "hot"
    finally:
        gw.stop()


def test_checkpoint_api_parks_a_vllm_process_run_as_a_command(vllm_python, smollm2, tmp_path):
    run = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}", "--served-model-name",
           "{name}", "--host", "{host}", "--port", "{port}", "--enforce-eager", "--gpu-memory-utilization", "0.3"]
    gw = Gateway({"models": [{"path": smollm2, "name": "ckpt", "backend": "command", "device": "cuda:0",
                              "park_after": 1, "idle_timeout": 600, "start_timeout": 900,
                              "command": {"run": run, "ready_path": "/health"}}]}, str(tmp_path))
    try:
        first = ask(gw, "ckpt")
        pid = gw.model("ckpt")["workers"][0]["pid"]
        gw.wait_for("checkpoint park", lambda: gw.model("ckpt")["state"] == "parked", timeout=120)
        assert (_measure.device_bytes(_measure.process_tree(pid), "cuda:0") or 0) < 64 << 20
        assert ask(gw, "ckpt") == first
        assert gw.cold_starts("ckpt", rung="parked") == 1
        assert "checkpoint" in gw.model("ckpt")["last_cold_start"]["phases"][0]["detail"]["how"]
    finally:
        gw.stop()

