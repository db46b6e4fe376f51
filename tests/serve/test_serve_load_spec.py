"""What a worker loads crosses the gateway↔worker boundary as one typed ``LoadSpec``: built once
from the model's config entry, given whole to a new worker (``--spec``) and to the standby worker
(``POST /zerostart/load``), read by the worker as it is (no engine runs here)."""

from __future__ import annotations

import pytest

from zerostart.engine import EngineConfig
from zerostart.serve._config import ModelConfig, ServerConfig
from zerostart.serve.backends import ZerostartWorker
from zerostart.serve.control import LoadSpec, load_spec
from zerostart.serve.worker._cli import _parser, _spec

GiB = 1 << 30


def _spec_arg(cmd: list[str]) -> LoadSpec:
    (arg,) = [a for a in cmd if a.startswith("--spec=")]
    return LoadSpec.model_validate_json(arg.removeprefix("--spec="))


def test_a_new_worker_and_the_standby_get_the_same_spec() -> None:
    cfg = ModelConfig(path="/models/llama", name="llama", device="cuda", dtype="bfloat16", max_model_len=512,
                      images="use", embedding={"pooling": "mean"})
    fresh = ZerostartWorker(cfg, ServerConfig(), "/tmp")
    standby = ZerostartWorker(None, ServerConfig(), "/tmp", standby_device="cuda:0")
    for w in (fresh, standby):  # as the fleet sizes a replica of it
        w.memory_share, w.weights_bytes, w.threads, w._parkable = 4 * GiB, GiB, 3, True
    sent = _spec_arg(fresh._command(5))
    assert sent == fresh.spec(cfg) == standby.spec(cfg) == load_spec(cfg, parkable=True, kv_cache_bytes=3 * GiB,
                                                                       threads=3)
    assert (sent.model, sent.name, sent.device, sent.dtype, sent.images, sent.parkable) == (
        "/models/llama", "llama", "cuda:0", "bfloat16", "use", True)
    assert sent.embedding is not None and sent.embedding.pooling == "mean"
    # the engine's settings are the engine's own typed config, sized for this replica
    assert sent.engine_options == EngineConfig(max_model_len=512, kv_cache_bytes=3 * GiB, threads=3)
    assert "--standby" in standby._command(5) and not any(a.startswith("--spec") for a in standby._command(5))


def test_an_engine_setting_is_validated_where_it_is_defined() -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        LoadSpec.model_validate({"model": "/m", "engine_options": {"max_model_len": -1}})
    with pytest.raises(ValueError, match="max_model_lenn"):
        LoadSpec.model_validate({"model": "/m", "engine_options": {"max_model_lenn": 9}})
    spec = LoadSpec.model_validate({"model": "/models/tiny", "engine_options": {"max_model_len": 64}})
    assert spec.name == "tiny" and spec.engine_options.max_model_len == 64 and spec.images == "off"
    assert LoadSpec.model_validate_json(spec.model_dump_json()) == spec


def test_the_worker_command_line_reads_the_same_object() -> None:
    p = _parser()
    spec = load_spec(ModelConfig(path="/models/tiny", max_model_len=64, images="off"), parkable=False)
    assert _spec(p.parse_args([f"--spec={spec.model_dump_json()}", "--fd", "3"]), p) == spec
    # by hand, the flags are a config entry's keys and make the same object
    hand = p.parse_args(["--model", "/models/tiny", "--max-model-len", "64", "--port", "1"])
    assert _spec(hand, p) == spec
    assert _spec(p.parse_args(["--standby", "--port", "1"]), p) is None


@pytest.mark.parametrize("argv, message", [
    (["--spec", '{"model": "/m"}', "--max-model-len", "8", "--fd", "3"], "--max-model-len: with --spec"),
    (["--standby", "--dtype", "float32", "--port", "1"], "a standby worker takes what to load in POST"),
    (["--spec", "{}", "--fd", "3"], "--spec: model: missing"),
    (["--model", "/m", "--max-model-len", "1", "--port", "1"], "--max-model-len:"),
])
def test_the_worker_command_line_names_what_is_wrong(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    p = _parser()
    with pytest.raises(SystemExit) as exit_:
        _spec(p.parse_args(argv), p)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
