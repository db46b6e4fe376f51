"""How each foreign backend turns a model's config and its memory share into the engine's
command line, and how shares are split (no engine runs here)."""

from __future__ import annotations

import json

import pytest

from zerostart.serve._config import ModelConfig, ServerConfig
from zerostart.serve.backends import _measure, _vllm
from zerostart.serve.backends._command import CommandWorker
from zerostart.serve.backends._sglang import SglangWorker
from zerostart.serve.backends._vllm import VllmWorker
from zerostart.serve.gateway._memory import memory_shares

GiB = 1 << 30


def model(**kw) -> ModelConfig:
    return ModelConfig.model_validate({"path": "/m", "name": "m", **kw})


def argv(worker) -> list[str]:
    worker._launch = worker._prepare()
    return worker.argv("127.0.0.1", 8123)


def flag(cmd: list[str], name: str) -> str:
    """The value of ``name`` in ``cmd``, written ``--name value`` or ``--name=value``."""
    for i, arg in enumerate(cmd):
        if arg == name:
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    raise AssertionError(f"{name} is not in {cmd}")


@pytest.fixture
def no_plugin(monkeypatch):
    monkeypatch.setattr(_vllm, "has_zerostart_loader", lambda python: False)


def test_vllm_cpu_kv_cache_from_the_share(tiny_model, monkeypatch):
    monkeypatch.setattr(_vllm, "has_zerostart_loader", lambda python: True)
    w = VllmWorker(model(path=tiny_model, backend="vllm", vllm={"python": "/venv/bin/python", "args": ["--enforce-eager"]}),
                   ServerConfig(), "/tmp")
    w.memory_share = 4 * GiB
    cmd = argv(w)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(cmd, "--load-format") == "zerostart" and flag(cmd, "--served-model-name") == "m"
    weights = _vllm.weight_bytes(w.model)
    assert weights > 0 and int(flag(cmd, "--kv-cache-memory-bytes")) == 4 * GiB - 2_400_000_000 - weights
    assert cmd[-1] == "--enforce-eager" and "--enable-sleep-mode" not in cmd
    w.memory_share = None
    assert int(flag(argv(w), "--kv-cache-memory-bytes")) == _vllm.CPU_KV_DEFAULT
    w2 = VllmWorker(model(path=tiny_model, backend="vllm", kv_cache_bytes="1GiB"), ServerConfig(), "/tmp")
    w2.memory_share = 8 * GiB
    assert int(flag(argv(w2), "--kv-cache-memory-bytes")) == GiB  # kv_cache_bytes wins


def test_vllm_remote_source_goes_through_zerostarts_loader(monkeypatch):
    monkeypatch.setattr(_vllm, "has_zerostart_loader", lambda python: True)
    from zerostart import weights

    monkeypatch.setattr(weights, "localize", lambda spec: "/cache/snapshot")
    w = VllmWorker(model(path="s3://bucket/smol", backend="vllm"), ServerConfig(), "/tmp")
    cmd = argv(w)
    assert flag(cmd, "--model") == "/cache/snapshot"
    assert json.loads(flag(cmd, "--model-loader-extra-config")) == {"source": "s3://bucket/smol"}


def test_vllm_without_the_plugin_cannot_read_s3(no_plugin):
    from zerostart.serve.edge import StartFailed

    w = VllmWorker(model(path="s3://bucket/smol", backend="vllm"), ServerConfig(), "/tmp")
    with pytest.raises(StartFailed, match="install zerostart in vLLM's environment"):
        w._prepare()


def test_vllm_cuda_share_and_sleep_mode(tiny_model, no_plugin, monkeypatch):
    monkeypatch.setattr(_measure, "device_total_bytes", lambda device: 80 * GiB)
    w = VllmWorker(model(path=tiny_model, backend="vllm", device="cuda:1"), ServerConfig(), "/tmp")
    w.memory_share, w.parkable = 20 * GiB, True
    cmd = argv(w)
    assert flag(cmd, "--gpu-memory-utilization") == "0.2500" and flag(cmd, "--load-format") == "auto"
    assert "--enable-sleep-mode" in cmd and w.engine_env()["VLLM_SERVER_DEV_MODE"] == "1"
    assert VllmWorker.parking(w.model) is None
    refusal = VllmWorker.parking(model(backend="vllm"))
    assert refusal is not None and "not supported on cpu" in refusal.message


def test_sglang_command_line(tiny_model, monkeypatch):
    monkeypatch.setattr(_measure, "device_total_bytes", lambda device: 40 * GiB)
    w = SglangWorker(model(path=tiny_model, backend="sglang", device="cuda", sglang={"args": ["--tp", "1"]}),
                     ServerConfig(), "/tmp")
    w.memory_share, w.parkable = 10 * GiB, True
    cmd = argv(w)
    assert cmd[1:3] == ["-m", "sglang.launch_server"] and flag(cmd, "--model-path") == tiny_model
    assert flag(cmd, "--mem-fraction-static") == "0.2500" and "--enable-memory-saver" in cmd
    assert flag(cmd, "--device") == "cuda" and cmd[-2:] == ["--tp", "1"]


def test_command_template():
    w = CommandWorker(model(path="/m.gguf", backend="command", device="cuda:0", command={
        "run": "llama-server -m {model} --alias {name} --host {host} --port {port} --mem {memory_bytes}"}),
        ServerConfig(), "/tmp")
    w.memory_share = 123
    assert w.argv("127.0.0.1", 9000) == ["llama-server", "-m", "/m.gguf", "--alias", "m", "--host", "127.0.0.1",
                                         "--port", "9000", "--mem", "123"]
    assert CommandWorker.parking(w.model) is None  # CUDA: the checkpoint API
    refused = CommandWorker.parking(model(backend="command", command={"run": "x {port}"}))
    assert refused is not None and "cannot park" in refused.message
    off = model(backend="command", device="cuda", command={"run": "x {port}", "checkpoint": False})
    refused = CommandWorker.parking(off)
    assert refused is not None and "checkpoint is off" in refused.message


def test_memory_shares_split_a_device():
    models = [model(name="a", device="cuda:0"), model(name="b", device="cuda:0", backend="vllm"),
              model(name="c", device="cuda:0", memory_estimate="10GiB"), model(name="d"), model(name="e", device="cuda:1")]
    shares = memory_shares(models, {"cuda:1": 8 * GiB}, device_total=lambda d: 90 * GiB if d == "cuda:0" else None)
    assert shares == {"a": 40 * GiB, "b": 40 * GiB, "c": 10 * GiB, "d": None, "e": 8 * GiB}
    assert memory_shares([model(name="x")], {"cpu": 6 * GiB}, device_total=lambda d: None) == {"x": 6 * GiB}


@pytest.mark.parametrize("make", [
    lambda p: VllmWorker(model(path=p, name="-m", backend="vllm", vllm={"python": "/venv/bin/python"}), ServerConfig(), "/tmp"),
    lambda p: SglangWorker(model(path=p, name="-m", backend="sglang", sglang={"python": "/venv/bin/python"}), ServerConfig(), "/tmp"),
])
def test_a_name_starting_with_a_dash_stays_a_value(make, tiny_model, no_plugin):
    # argparse reads "--served-model-name -m" as a missing value; "--served-model-name=-m" is "-m"
    # (paths reach the engine absolute, so only names can start with "-")
    cmd = argv(make(tiny_model))
    assert "--served-model-name=-m" in cmd and "-m" not in cmd[3:], cmd


def test_vllm_answers_only_its_gateway(tiny_model, no_plugin):
    w = VllmWorker(model(path=tiny_model, backend="vllm", vllm={"python": "/venv/bin/python"}), ServerConfig(), "/tmp")
    assert w.engine_env()["VLLM_API_KEY"] == w.process.token and len(w.process.token) >= 32
