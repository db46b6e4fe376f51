"""The ``llamacpp`` backend's parts that need no llama-server: its config, command line, secret
file, the requests it refuses before a start, its rungs, and its phases from its log lines
(recorded from the real llama-server; ``test_serve_llamacpp.py`` runs the real one)."""

from __future__ import annotations

import os
import stat

import pytest

from zerostart.names import Rung
from zerostart.serve._config import ConfigError, ModelConfig, ServerConfig, load_config
from zerostart.serve.edge import ROUTES, BadRequest, NotServed, StartFailed, parse_request
from zerostart.serve.backends import BACKENDS, LlamacppWorker
from zerostart.serve.backends import _llamacpp
from zerostart.serve.backends._log_phases import LLAMACPP_DETAILS, LLAMACPP_LAST, LLAMACPP_MARKERS, LogPhases


def model(path: str = "/m.gguf", **kw) -> ModelConfig:
    return ModelConfig.model_validate({"path": path, "name": "smol", "backend": "llamacpp", **kw})


@pytest.fixture
def gguf(tmp_path) -> str:
    p = tmp_path / "smol.Q4_1.gguf"
    p.write_bytes(b"GGUF" + bytes(4092))
    return str(p)


@pytest.fixture
def fake_server(tmp_path) -> str:
    p = tmp_path / "bin" / "llama-server"
    p.parent.mkdir()
    p.write_text("#!/bin/sh\nexit 0\n")
    p.chmod(0o755)
    return str(p)


def argv(w: LlamacppWorker) -> list[str]:
    w._launch = w._prepare()
    return w.argv("127.0.0.1", 8123)


def flag(cmd: list[str], name: str) -> str:
    i = cmd.index(name)
    return cmd[i + 1]


# -- config -------------------------------------------------------------------------------------


def test_registered_and_defaults():
    assert BACKENDS["llamacpp"] is LlamacppWorker
    m = model()
    assert m.llamacpp is not None and m.llamacpp.parallel == 4 and m.llamacpp.ctx_size is None


@pytest.mark.parametrize("entry, error", [
    ({"llamacpp": {"args": ["--port", "9"]}}, "--port: set by zerostart"),
    ({"llamacpp": {"args": ["-m", "/x.gguf", "--api-key", "k"]}}, "-m, --api-key: set by zerostart"),
    ({"llamacpp": {"parallel": 0}}, "parallel"),
    ({"kv_cache_bytes": "1GiB"}, "llama.cpp sizes its KV cache in tokens; set llamacpp.ctx_size"),
    ({"dtype": "bfloat16"}, "computes in the GGUF file's own types"),
    ({"backend": "zerostart", "llamacpp": {}}, "options of backend: llamacpp"),
])
def test_config_errors_name_the_key(entry, error):
    with pytest.raises(ConfigError, match=error):
        load_config(data={"models": [{"path": "/m.gguf", "backend": "llamacpp", **entry}]})


# -- the command line and the secret --------------------------------------------------------------


def test_command_line(gguf, fake_server, tmp_path):
    w = LlamacppWorker(model(gguf, name="-smol", max_model_len=2048, llamacpp={
        "server": fake_server, "parallel": 8, "args": ["--flash-attn", "on"]}), ServerConfig(), str(tmp_path))
    w.threads = 3
    cmd = argv(w)
    assert cmd[0] == fake_server
    # two words per option: llama.cpp takes no --opt=value, and the word after an option is its
    # value whatever it begins with (a name beginning with "-" stays a name)
    assert not any(a.startswith("--") and "=" in a for a in cmd)
    assert flag(cmd, "--model") == gguf and flag(cmd, "--alias") == "-smol"
    assert flag(cmd, "--host") == "127.0.0.1" and flag(cmd, "--port") == "8123"
    assert flag(cmd, "--threads") == "3" and flag(cmd, "--threads-batch") == "3"
    assert flag(cmd, "--parallel") == "8" and "--kv-unified" in cmd and "--metrics" in cmd
    assert flag(cmd, "--ctx-size") == str(8 * 2048) and flag(cmd, "--kv-unified-per-slot") == "2048"
    assert flag(cmd, "--device") == "none" and "--n-gpu-layers" not in cmd
    assert cmd[-2:] == ["--flash-attn", "on"]
    assert flag(cmd, "--api-key-file").startswith(str(tmp_path)) and w.process.token not in " ".join(cmd)
    assert "ZEROSTART_WORKER_TOKEN" not in w.engine_env() and w.process.token not in w.engine_env().values()


def test_context_gpu_and_embedding_flags(gguf, fake_server, tmp_path):
    w = LlamacppWorker(model(gguf, device="cuda:1", llamacpp={"server": fake_server, "ctx_size": 4096},
                             embedding={"pooling": "mean"}), ServerConfig(), str(tmp_path))
    cmd = argv(w)
    assert flag(cmd, "--ctx-size") == "4096" and "--kv-unified-per-slot" not in cmd
    assert flag(cmd, "--device") == "CUDA1" and flag(cmd, "--n-gpu-layers") == "999"
    assert "--embeddings" in cmd and flag(cmd, "--pooling") == "mean" and flag(cmd, "--embd-normalize") == "2"
    assert "--threads" not in cmd  # no thread count from the fleet: llama.cpp's own


def test_the_key_file_is_private_and_goes_away(gguf, fake_server, tmp_path):
    w = LlamacppWorker(model(gguf, llamacpp={"server": fake_server}), ServerConfig(), str(tmp_path))
    w._write_key()
    path = flag(argv(w), "--api-key-file")
    with open(path) as f:
        assert f.read() == w.process.token + "\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    w._remove_key()
    assert not os.path.exists(path)


def test_what_cannot_start_says_why(tmp_path, fake_server, monkeypatch):
    w = LlamacppWorker(model(str(tmp_path / "missing.gguf"), llamacpp={"server": str(tmp_path / "nope")}),
                       ServerConfig(), str(tmp_path))
    with pytest.raises(StartFailed, match="no llama-server at .*nope; build it with `make llamacpp-env` or set "
                                          "llamacpp.server"):
        w._prepare()
    (tmp_path / "model.safetensors").write_bytes(b"x")
    w = LlamacppWorker(model(str(tmp_path / "model.safetensors"), llamacpp={"server": fake_server}), ServerConfig(),
                       str(tmp_path))
    with pytest.raises(StartFailed, match="llama.cpp serves GGUF files; .*model.safetensors is not one"):
        w._prepare()
    w = LlamacppWorker(model("s3://bucket/m.gguf", llamacpp={"server": fake_server}), ServerConfig(), str(tmp_path))
    with pytest.raises(StartFailed, match="llama.cpp reads local GGUF files and hf://"):
        w._prepare()


def test_the_server_is_found_in_the_checkout_then_on_path(tmp_path, monkeypatch, fake_server):
    monkeypatch.setattr(_llamacpp, "BUILD_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("PATH", os.path.dirname(fake_server))
    assert _llamacpp.find_server(None) == fake_server
    assert _llamacpp.find_server("~/x/llama-server") == os.path.expanduser("~/x/llama-server")


# -- rungs and refusals -----------------------------------------------------------------------------


def test_rungs_and_the_page_cache(gguf, fake_server, tmp_path):
    from zerostart import weights

    assert "parked" in LlamacppWorker.missing_rungs(model()) and "image" not in LlamacppWorker.missing_rungs(model())
    assert "SIGSTOP frees nothing" in LlamacppWorker.missing_rungs(model())[Rung.PARKED]
    assert LlamacppWorker.missing_rungs(model(device="cuda")) == {}  # the CUDA checkpoint API parks any process
    w = LlamacppWorker(model(gguf, llamacpp={"server": fake_server}), ServerConfig(), str(tmp_path))
    with open(gguf, "rb") as f:
        f.read()
    if weights.cached_fraction(gguf) < 0.9:
        pytest.skip("the page cache did not keep a file just read")
    assert w._prepare()[2] > _llamacpp.WARM_FRACTION
    weights.evict_page_cache([gguf])
    assert w._prepare()[2] < _llamacpp.WARM_FRACTION


def request(path: str, **body):
    return parse_request(ROUTES[path], __import__("json").dumps({"model": "smol", **body}).encode())


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 2}, "echo"),
    ("/v1/completions", {"prompt": "x", "best_of": 1}, "best_of"),
    ("/v1/completions", {"prompt": "x", "n": 5}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [2]}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_tokens": 3}, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1.1}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options"),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions"),
])
def test_what_llama_server_lacks_is_refused_before_a_start(path, body, param):
    err = LlamacppWorker.refuse(model(), path, request(path, **body))
    assert isinstance(err, BadRequest) and err.param == param and "backend llamacpp" in err.message


def test_what_it_serves_passes_and_vllms_tokenize_is_not_served():
    chat = request("/v1/chat/completions", messages=[{"role": "user", "content": "x"}], n=4, logprobs=True,
                   top_logprobs=2, seed=1, response_format={"type": "json_object"})
    assert LlamacppWorker.refuse(model(), "/v1/chat/completions", chat) is None
    assert LlamacppWorker.refuse(model(), "/v1/completions", request("/v1/completions", prompt=[1, 2], logprobs=3)) \
        is None
    err = LlamacppWorker.refuse(model(), "/tokenize", request("/tokenize", prompt="x"))
    assert isinstance(err, NotServed) and err.status == 501


# -- phases from its log ----------------------------------------------------------------------------

# Lines llama-server (build 11434, CPU) printed during one start of SmolLM2-135M-Instruct Q4_1 here,
# at its default verbosity, with the seconds since the spawn at which they arrived (a busy machine).
LLAMACPP_LOG = [
    (0.055, "0.00.014.598 I srv  llama_server: initializing ..."),
    (0.055, "0.00.014.776 I srv  init_listene: The UI is disabled"),
    (0.058, "0.00.018.371 I srv    load_model: loading model '/m/SmolLM2-135M-Instruct.Q4_1.gguf'"),
    (1.525, "0.01.485.727 I cmn          init: llama threadpool init, n_threads = 2"),
    (5.587, "0.05.547.050 I srv    load_model: initializing, n_slots = 4, n_ctx_slot = 8192, kv_unified = 'true'"),
    (5.593, "0.05.549.275 I srv  llama_server: model loaded"),
    (5.594, "0.05.549.293 I srv  llama_server: listening on http://127.0.0.1:18123"),
]
# What -lv 4 adds (in llamacpp.args): the sizes of the weights mapped and of the KV cache.
LLAMACPP_TRACE = [
    (0.369, "0.00.335.006 I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB"),
    (0.717, "0.00.682.582 I llama_kv_cache: size =  180.00 MiB (  8192 cells,  30 layers,  4/1 seqs), "
            "K (f16):   90.00 MiB, V (f16):   90.00 MiB"),
]


def test_phases_follow_its_log():
    p = LogPhases(LLAMACPP_MARKERS, LLAMACPP_LAST, origin=100.0, details=LLAMACPP_DETAILS)
    assert p.current == "device_init"
    for at, line in sorted(LLAMACPP_LOG + LLAMACPP_TRACE):
        p.feed(line, 100.0 + at)
    assert p.current == "server_init"
    tl = p.timeline(ready_at=100.0 + 5.599)
    got = {ph.name: (round(ph.start, 3), round(ph.end, 3)) for ph in tl.phases}
    assert got == {"device_init": (0.0, 0.058), "read": (0.058, 1.525), "warmup": (1.525, 5.587),
                   "server_init": (5.587, 5.599)}
    d = {ph.name: ph.detail for ph in tl.phases}
    assert d["read"] == {"threads": 2, "weights_mib": 92.1, "kv_mib": 180.0, "kv_tokens": 8192}
    assert d["warmup"] == {"slots": 4, "slot_tokens": 8192}


def test_bench_engines_prices_its_rungs_for_the_policies(gguf):
    """``bench engines --llamacpp-coldstart`` writes what the policies' cost model reads: a
    restart from the page cache (image) and from disk (source)."""
    from zerostart.bench import engines
    from zerostart.policy import CostModel, Rung

    assert engines._quant(gguf) == "Q4_1" and engines._quant("/m/smollm2-f16.gguf") == "f16"
    rows = [{"row": "llama.cpp Q4_1 source", "first_token_s": 1.4}, {"row": "llama.cpp Q4_1 image", "first_token_s": 0.6},
            {"row": "llama.cpp Q4_1 sleep", "first_token_s": 0.7}, {"row": "zerostart source", "first_token_s": 2.0}]
    telemetry = engines._telemetry(gguf, rows)
    assert telemetry["rungs"] == {"source": {"median_s": 1.4}, "image": {"median_s": 0.6}}
    costs = CostModel().with_coldstart(telemetry, model="smol")
    assert costs.wake_s(Rung.IMAGE, 4096, "smol") == 0.6 and costs.wake_s(Rung.ZERO, 4096, "smol") == 1.4


def test_an_hf_source_serves_one_gguf_file_of_its_repository(tmp_path, monkeypatch, fake_server):
    pytest.importorskip("huggingface_hub")
    from tests.weights._hub import Hub, Repo

    hub = Hub()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HOME"):
            monkeypatch.delenv(var, raising=False)
        root = tmp_path / "repo"
        root.mkdir()
        for name in ("smol.Q4_1.gguf", "smol.Q8_0.gguf"):
            (root / name).write_bytes(b"GGUF" + bytes(4092))
        hub.repos["org/smol"] = Repo(str(root))
        w = LlamacppWorker(model("hf://org/smol", llamacpp={"server": fake_server, "file": "smol.Q8_0.gguf"}),
                           ServerConfig(), str(tmp_path))
        server, gguf, _ = w._prepare()
        assert gguf.endswith("/smol.Q8_0.gguf") and gguf.startswith(str(tmp_path / "hub-cache"))
        w = LlamacppWorker(model("hf://org/smol", llamacpp={"server": fake_server}), ServerConfig(), str(tmp_path))
        with pytest.raises(StartFailed, match=r"holds 2 .gguf files; name the one to serve .* \(llamacpp.file names it\)"):
            w._prepare()
    finally:
        hub.close()
