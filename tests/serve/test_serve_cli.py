"""``zerostart serve`` on the command line: the demo model, flags, and startup errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from zerostart.serve._demo import demo_model_dir, ensure_demo_model

from tests.serve._helpers import Gateway, child_env


def test_demo_model_is_created_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(tmp_path))
    out = io.StringIO()
    path = ensure_demo_model(out, size="tiny")
    assert path == os.path.join(str(tmp_path), "demo", "tiny") == demo_model_dir("tiny")
    assert os.path.isfile(os.path.join(path, "config.json")) and "creating the tiny demo model" in out.getvalue()
    assert [p for p in os.listdir(tmp_path / "demo") if ".tmp-" in p] == []  # written aside, then renamed
    again = io.StringIO()
    assert ensure_demo_model(again, size="tiny") == path and again.getvalue() == ""


def test_an_older_second_copy_of_the_demo_is_removed(tiny_model: str, tmp_path, monkeypatch) -> None:
    from zerostart.engine.demo import MARKER, smollm2_default_dir

    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(tmp_path))
    assert demo_model_dir() == smollm2_default_dir()  # the one copy `zerostart demo-model` writes too
    shutil.copytree(tiny_model, demo_model_dir())
    old = tmp_path / "demo" / "smollm2"  # where earlier versions converted SmolLM2 a second time
    shutil.copytree(tiny_model, old)
    (old / MARKER).write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "dtype": "bfloat16"}))
    other = tmp_path / "demo" / "tiny"  # a random-weights demo stays
    shutil.copytree(tiny_model, other)
    out = io.StringIO()
    assert ensure_demo_model(out) == demo_model_dir()
    assert not old.exists() and other.exists() and "an older second copy" in out.getvalue()
    assert sorted(os.listdir(tmp_path / "demo")) == sorted([os.path.basename(demo_model_dir()), "tiny"])


@pytest.mark.slow
def test_demo_model_and_serve_share_one_copy(tmp_path, monkeypatch) -> None:
    """`zerostart demo-model` and the server's demo convert SmolLM2 into the same directory, once."""
    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "zerostart", "demo-model"], env={**child_env(), "ZEROSTART_CACHE_DIR":
                       str(tmp_path)}, capture_output=True, text=True, check=True)
    written = r.stdout.strip()
    out = io.StringIO()
    assert ensure_demo_model(out) == written == demo_model_dir() and out.getvalue() == ""  # nothing converted again
    assert os.listdir(tmp_path / "demo") == [os.path.basename(written)]


def test_serve_without_a_model_serves_the_demo(tiny_model: str, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(cache))
    shutil.copytree(tiny_model, demo_model_dir())  # stands in for SmolLM2 converted on an earlier run
    gw = Gateway({}, str(tmp_path), extra_args=["--idle-timeout", "30s"])
    try:
        banner = "".join(gw.log)
        assert "built-in demo model 'demo' (SmolLM2-135M-Instruct)" in banner
        assert [m.id for m in gw.openai().models.list().data] == ["demo"]
        c = gw.openai().completions.create(model="demo", prompt="hi", max_tokens=2)
        assert c.model == "demo" and c.usage.completion_tokens >= 1
        assert gw.model("demo")["keep_alive_s"] == 30
    finally:
        gw.stop()


def _serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zerostart", "serve", *args], env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_startup_errors_name_what_is_wrong(tiny_model: str, tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models:\n  - path: {tiny_model}\n    idle_timout: 3\n")
    r = _serve("--config", str(cfg))
    assert r.returncode == 1
    assert "zerostart: error:" in r.stderr and "models[0].idle_timout: unknown key (did you mean 'idle_timeout'?)" in r.stderr

    r = _serve("--model", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "models[0] (nowhere).path:" in r.stderr and "no such file" in r.stderr

    cfg.write_text(f"devices:\n  cpu:\n    memory_budget: 1KiB\nmodels:\n  - path: {tiny_model}\n")
    r = _serve("--config", str(cfg))
    assert r.returncode == 1 and "more than devices.cpu.memory_budget" in r.stderr

    cfg.write_text(f"models:\n  - path: {tiny_model}\n    keep_alive_policy: ttl:soon\n")
    r = _serve("--config", str(cfg))
    assert r.returncode == 1 and "models[0] (tiny).keep_alive_policy:" in r.stderr and "ttl" in r.stderr

    r = _serve("--model", tiny_model, "--idle-timeout", "soon")
    assert r.returncode == 1 and "--idle-timeout: expected a duration" in r.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _serve("--model", tiny_model, "--port", str(port))
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_model_flag_names_the_model_after_its_directory(tiny_model: str, tmp_path) -> None:
    gw = Gateway({"server": {"worker_transport": "tcp"}}, str(tmp_path), extra_args=["--model", tiny_model])
    try:
        assert [m.id for m in gw.openai().models.list().data] == [os.path.basename(tiny_model)]
        out = gw.openai().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=2)
        assert out.choices[0].message.role == "assistant"
        assert gw.model("tiny")["workers"][0]["address"].startswith("http://127.0.0.1:")  # a loopback worker
        kv = gw.model("tiny")["workers"][0]["kv"]  # the worker's KV capacity, in /zerostart/status
        assert kv["tokens"] == kv["blocks"] * kv["block_tokens"] > 0 and kv["slots"] > 0
    finally:
        gw.stop()


def test_a_non_loopback_address_without_api_keys_is_refused(tiny_model: str, tmp_path) -> None:
    r = _serve("--model", tiny_model, "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 1 and "reachable from other machines" in r.stderr and "--allow-unauthenticated" in r.stderr
    gw = Gateway({}, str(tmp_path), extra_args=["--model", tiny_model, "--host", "0.0.0.0",
                                                "--allow-unauthenticated"])
    try:
        assert gw.url.startswith("http://0.0.0.0:") and gw.http.get("/health").status_code == 200
    finally:
        gw.stop()


def test_help() -> None:
    r = _serve("--help")
    assert r.returncode == 0 and "--idle-timeout" in r.stdout and "--config" in r.stdout


@pytest.mark.slow
def test_the_demo_answers_sensibly(smollm2_dir: str, tmp_path, monkeypatch) -> None:
    """`zerostart serve` with no model, then the README's first request: SmolLM2 answers it."""
    cache = tmp_path / "cache"
    shutil.copytree(smollm2_dir, cache / "demo" / "smollm2")  # converted once per test session
    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(cache))
    gw = Gateway({}, str(tmp_path))
    try:
        r = gw.http.post("/v1/chat/completions", json={
            "model": "demo", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32, "temperature": 0}, timeout=300)
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
    finally:
        gw.stop()
