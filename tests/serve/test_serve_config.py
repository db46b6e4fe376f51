"""The config schema, its error messages, the documented example config, and the units."""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from zerostart.serve._config import (ConfigError, DeviceConfig, ModelConfig, PrewarmWindow, ServeConfig, ServerConfig,
                                     load_config)
from zerostart.serve._config_backends import CommandOptions, LlamacppOptions, SglangOptions, VllmOptions
from zerostart.serve._config_cluster import ClusterConfig, IngressConfig, PlacementConfig, PoolConfig

from tests.serve._helpers import ROOT

EXAMPLE = os.path.join(ROOT, "examples", "config.yaml")


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(data=data)
    return str(e.value)


def test_minimal_config_and_defaults(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - path: models/llama-3.2-1b/\n")
    cfg = load_config(path)
    m = cfg.models[0]
    assert m.path == str(tmp_path / "models" / "llama-3.2-1b")  # relative to the file
    assert m.served_name == "llama-3.2-1b"
    assert m.idle_timeout == 300 and m.max_queued == 512 and m.min_replicas == 0 and m.device == "cpu"
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000 and cfg.server.api_keys == []
    assert load_config(data={"models": [{"path": "/x/model.safetensors"}]}).models[0].served_name == "model"
    assert load_config(data={"models": [{"path": "/x/y", "name": "z"}]}).models[0].served_name == "z"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).models == []


@pytest.mark.parametrize("data, expected", [
    ({"models": [{"path": "x", "idle_timout": 3}]}, "models[0].idle_timout: unknown key (did you mean 'idle_timeout'?)"),
    ({"server": {"prot": 1}}, "server.prot: unknown key (did you mean 'port'?)"),
    ({"srv": {}}, "srv: unknown key"),
    ({"models": [{"name": "x"}]}, "models[0].path: missing, and has no default"),
    ({"server": {"port": 70000}}, "server.port: Input should be less than or equal to 65535"),
    ({"models": [{"path": "x", "idle_timeout": "soon"}]}, "models[0].idle_timeout: expected a duration"),
    ({"models": [{"path": "x", "start_timeout": 0}]}, "models[0].start_timeout: Input should be greater than 0"),
    ({"models": [{"path": "x", "max_queued": -1}]}, "models[0].max_queued: Input should be greater than or equal to 0"),
    ({"models": [{"path": "x", "memory_estimate": "lots"}]}, "models[0].memory_estimate: expected a size"),
    ({"models": [{"path": "x", "device": "tpu"}]}, "models[0].device: unknown device 'tpu'"),
    ({"models": [{"path": "x", "dtype": "int8"}]}, "models[0].dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ({"models": [{"path": "x", "min_replicas": 2}]}, "models[0]: min_replicas (2) is above max_replicas (1)"),
    ({"models": [{"path": "x", "prewarm": [{"cron": "every day", "duration": 5}]}]},
     "models[0].prewarm[0].cron: 'every day' is not a valid cron expression"),
    ({"models": [{"path": "x", "prewarm": [{"cron": "* * * * *"}]}]}, "models[0].prewarm[0].duration: missing"),
    ({"models": [{"path": "a/m"}, {"path": "b/m"}]}, "models[0] and models[1] are both named 'm'"),
    ({"devices": {"cpu": {"memory_budgt": 1}}}, "devices.cpu.memory_budgt: unknown key (did you mean 'memory_budget'?)"),
    ({"server": {"api_keys": ["has space"]}}, "server.api_keys: API keys must be non-empty and contain no whitespace"),
    ({"models": {"path": "x"}}, "models: Input should be a valid list"),
    ({"server": {"standby_reserve": "lots"}}, "server.standby_reserve: expected a size (bytes, or a string like "
                                              "'512MiB', '8GiB'), got 'lots', or 'auto'"),
    ({"server": {"standby_reserve": -1}}, "server.standby_reserve: a size must be a non-negative number of bytes"),
])
def test_errors_name_the_key(data: dict[str, Any], expected: str) -> None:
    assert expected in _error(data)


@pytest.mark.parametrize("value, resolved", [(0, 0), ("8GiB", 8 << 30), (4096, 4096), ("auto", "auto")])
def test_standby_reserve(value: Any, resolved: Any) -> None:
    assert load_config(data={"server": {"standby_reserve": value}}).server.standby_reserve == resolved


def test_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- path: x\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(listy)


def test_yaml_booleans_are_only_true_and_false(tmp_path) -> None:
    """YAML 1.1 reads off/no/on/yes as booleans: an unquoted ``images: off`` arrived as False
    and was refused with a message about booleans (issue 15, item 9)."""
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - path: x\n    name: no\n    images: off\n    parkable: true\n"
                    "  - path: y\n    images: use\n    parkable: FALSE\n")
    cfg = load_config(path)
    assert cfg.models[0].images == "off" and cfg.models[0].served_name == "no" and cfg.models[0].parkable is True
    assert cfg.models[1].parkable is False


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "example.invalid"])
def test_listening_beyond_loopback_needs_api_keys(host: str) -> None:
    msg = _error({"server": {"host": host}})
    assert f"host {host!r} is reachable from other machines" in msg and "api_keys" in msg
    assert "allow_unauthenticated" in msg
    assert load_config(data={"server": {"host": host, "api_keys": ["k"]}}).server.host == host
    assert load_config(data={"server": {"host": host, "allow_unauthenticated": True}}).server.host == host


def test_api_keys_from_the_environment_join_the_files(monkeypatch) -> None:
    monkeypatch.setenv("ZEROSTART_API_KEYS", " k2, ,k3 ")
    assert load_config(data={"server": {"api_keys": ["k1"]}}).server.api_keys == ["k1", "k2", "k3"]
    assert load_config(data={"server": {"host": "0.0.0.0"}}).server.api_keys == ["k2", "k3"]  # not refused
    assert load_config().server.api_keys == ["k2", "k3"]
    monkeypatch.setenv("ZEROSTART_API_KEYS", "a b")
    assert "API keys must be non-empty and contain no whitespace" in _error({})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_needs_nothing(host: str) -> None:
    assert load_config(data={"server": {"host": host}}).server.host == host


def test_devices_normalize() -> None:
    cfg = load_config(data={"devices": {"cuda": {"memory_budget": "70GiB"}}, "models": [{"path": "x", "device": "CUDA"}]})
    assert cfg.devices["cuda:0"].memory_budget == 70 * 2**30 and cfg.models[0].device == "cuda:0"


# -- the documented example config ------------------------------------------------------------

def _defaults(schema: type[BaseModel]) -> dict[str, Any]:
    return {name: f.get_default(call_default_factory=True) for name, f in schema.model_fields.items()
            if not f.is_required()}


def test_example_config_documents_every_key_with_its_default() -> None:
    with open(EXAMPLE) as f:
        raw = yaml.safe_load(f)
    cfg = load_config(EXAMPLE)  # it is valid
    assert set(raw) == set(ServeConfig.model_fields)

    # server: every key, each at its default
    assert set(raw["server"]) == set(ServerConfig.model_fields)
    assert cfg.server.model_dump() == ServerConfig().model_dump()

    # devices: an example device with every key at its default
    assert set(raw["devices"]["cpu"]) == set(DeviceConfig.model_fields)
    assert cfg.devices["cpu"].model_dump() == DeviceConfig().model_dump()

    # models[0]: every key; all but the required path at their defaults
    first = raw["models"][0]
    assert set(first) == set(ModelConfig.model_fields)
    parsed = cfg.models[0]
    for key, default in _defaults(ModelConfig).items():
        assert getattr(parsed, key) == default, key
    # models[1] shows a pre-warm window with every key of one
    assert set(raw["models"][1]["prewarm"][0]) == set(PrewarmWindow.model_fields)
    # models[2..5]: each backend's options, every key, at its default (command: all but run)
    for i, key, schema in ((2, "vllm", VllmOptions), (3, "sglang", SglangOptions), (4, "command", CommandOptions),
                           (5, "llamacpp", LlamacppOptions)):
        assert raw["models"][i]["backend"] == key
        assert set(raw["models"][i][key]) == set(schema.model_fields), key
        parsed_options = getattr(cfg.models[i], key)
        for name, default in _defaults(schema).items():
            assert getattr(parsed_options, name) == default, f"{key}.{name}"

    # cluster: every key at its default, and one pool with every key (its placement at the defaults)
    cluster = raw["cluster"]
    assert set(cluster) == set(ClusterConfig.model_fields)
    assert set(cluster["ingress"]) == set(IngressConfig.model_fields)
    assert cfg.cluster.model_dump(exclude={"pools"}) == ClusterConfig().model_dump(exclude={"pools"})
    pool = raw["cluster"]["pools"][0]
    assert set(pool) == set(PoolConfig.model_fields)
    assert set(pool["placement"]) == set(PlacementConfig.model_fields)
    parsed_pool = cfg.cluster.pools[0]
    for key, default in _defaults(PoolConfig).items():
        assert getattr(parsed_pool, key) == default, key


def test_defaults_live_in_one_place() -> None:
    """The library reads its defaults from the schema, so the example and the code agree."""
    m = ModelConfig(path="/x")
    assert m.max_queued == 512 and m.idle_timeout == 300


def test_quantize_is_a_model_setting() -> None:
    """How the engine holds a model's matrices: auto by default, refused by name otherwise; the
    worker's command line takes it into its load spec."""
    from zerostart.serve.worker._cli import _parser, _spec  # the worker's command line: uvicorn, the worker's app

    assert load_config(data={"models": [{"path": "/x/m.gguf"}]}).models[0].quantize == "auto"
    assert load_config(data={"models": [{"path": "/x/m", "quantize": "int4"}]}).models[0].quantize == "int4"
    assert "quantize" in _error({"models": [{"path": "/x/m", "quantize": "int3"}]})
    parser = _parser()
    spec = _spec(parser.parse_args(["--model", "/x/m", "--port", "8001", "--quantize", "int8"]), parser)
    assert spec is not None and spec.engine_options.quantize == "int8"


def test_kv_dtype_is_a_model_setting_of_the_zerostart_engine(capsys) -> None:
    """The KV cache's dtype: auto by default, into the engine's options and the worker's load
    spec; refused by name for another backend (which takes its own flag)."""
    from zerostart.serve.worker._cli import _parser, _spec  # the worker's command line: uvicorn, the worker's app

    model = load_config(data={"models": [{"path": "/x/m", "kv_dtype": "bfloat16"}]}).models[0]
    assert model.engine_config(kv_cache_bytes=None, threads=None).kv_dtype == "bfloat16"
    assert load_config(data={"models": [{"path": "/x/m"}]}).models[0].kv_dtype == "auto"
    assert "kv_dtype" in _error({"models": [{"path": "/x/m", "kv_dtype": "fp8"}]})
    assert "float16 is for CUDA" in _error({"models": [{"path": "/x/m", "kv_dtype": "float16"}]})
    assert load_config(data={"models": [{"path": "/x/m", "device": "cuda", "kv_dtype": "float16"}]}).models[0]
    assert "--cache-type-k" in _error({"models": [{"path": "/x/m.gguf", "backend": "llamacpp", "kv_dtype": "float16"}]})
    parser = _parser()
    spec = _spec(parser.parse_args(["--model", "/x/m", "--port", "8001", "--kv-dtype", "float32"]), parser)
    assert spec is not None and spec.engine_options.kv_dtype == "float32"
    with pytest.raises(SystemExit):  # a check across keys (the device's) named by its flag too
        _spec(parser.parse_args(["--model", "/x/m", "--port", "8001", "--kv-dtype", "float16"]), parser)
    assert "--kv-dtype: float16 is for CUDA" in capsys.readouterr().err
