"""Faults, end to end: workers that die mid-request, checkpoints that fail to load, workers that
cannot start, starts that take too long."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time

import openai
import pytest

from tests.serve._helpers import Gateway


@pytest.fixture(scope="module")
def broken_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny checkpoint with a config that asks for one more layer than the weights hold:
    its headers are fine (the gateway estimates its memory), its load fails in the worker."""
    out = str(tmp_path_factory.mktemp("broken") / "broken")
    shutil.copytree(tiny_model, out)
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] += 1
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return out


@pytest.fixture(scope="module")
def gw(tiny_model: str, broken_model: str, tmp_path_factory: pytest.TempPathFactory):
    config = {"models": [
        {"path": tiny_model, "name": "crashy", "idle_timeout": 60},
        {"path": broken_model, "name": "broken", "start_backoff": 30},
        {"path": tiny_model, "name": "nostart", "env": {"PYTHONHOME": "/nonexistent"}, "start_backoff": 30},
        {"path": tiny_model, "name": "slow", "start_timeout": 0.3, "start_backoff": 30},
    ]}
    g = Gateway(config, str(tmp_path_factory.mktemp("faults")))
    yield g
    g.stop()


def test_worker_killed_mid_request(gw: Gateway) -> None:
    client = gw.openai()
    long = dict(model="crashy", prompt="go", max_tokens=900, extra_body={"ignore_eos": True})
    stream = client.completions.create(stream=True, **long)
    chunks = iter(stream)
    next(chunks)  # the model is hot and streaming ...
    pid = gw.model("crashy")["workers"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # ... and stays mid-stream, however fast this machine generates
    unary: dict[str, BaseException] = {}

    def unary_request() -> None:
        try:
            client.completions.create(**long)
        except openai.APIError as e:
            unary["error"] = e

    t = threading.Thread(target=unary_request)
    t.start()
    gw.wait_for("two requests in flight", lambda: gw.model("crashy")["in_flight"] == 2)
    os.kill(pid, signal.SIGKILL)

    with pytest.raises(openai.APIError) as e:
        for _ in chunks:
            pass
    assert "exited with signal SIGKILL while serving this request" in e.value.message
    assert "next request starts a new worker" in e.value.message
    t.join(30)
    assert isinstance(unary["error"], openai.InternalServerError) and unary["error"].status_code == 502
    assert "SIGKILL" in unary["error"].message

    gw.wait_for("crashy at zero", lambda: gw.model("crashy")["state"] == "zero")
    assert gw.metric("zerostart_worker_crashes_total", model="crashy") == 1
    assert gw.metric("zerostart_requests_total", model="crashy", status="stream_error") == 1
    assert gw.metric("zerostart_requests_total", model="crashy", status="502") == 1

    raw = client.completions.with_raw_response.create(model="crashy", prompt="again", max_tokens=2)
    assert int(raw.headers["x-zerostart-cold-start-ms"]) > 0  # a new worker
    assert gw.model("crashy")["workers"][0]["pid"] != pid
    assert gw.cold_starts("crashy") == 2


def test_checkpoint_that_fails_to_load(gw: Gateway) -> None:
    client = gw.openai()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="broken", prompt="x", max_tokens=2)
    err = e.value
    assert err.status_code == 503 and isinstance(err.body, dict) and err.body["code"] == "model_start_failed"
    assert "'broken' failed to load" in err.message and "broken" in err.message
    assert "layers.2" in err.message  # the engine's own words: the tensor it could not find
    assert int(err.response.headers["retry-after"]) >= 29
    m = gw.model("broken")
    assert m["state"] == "zero" and m["workers"] == [] and m["backoff_s"] > 25 and "layers.2" in m["last_error"]

    # back-off: an immediate retry is answered at once with the same cause and no new start
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e2:
        client.completions.create(model="broken", prompt="x", max_tokens=2)
    assert time.monotonic() - t0 < 1.0
    assert "layers.2" in e2.value.message and "the next start is in" in e2.value.message
    assert 1 <= int(e2.value.response.headers["retry-after"]) <= 30

    # nor do many clients asking at once start it again
    async def many() -> list:
        return await gw.burst(50, clients=5, model="broken", prompt="x", max_tokens=2)

    results = asyncio.run(many())
    assert all(isinstance(r, openai.InternalServerError) and r.status_code == 503 for r in results)
    assert gw.metric("zerostart_start_failures_total", model="broken", cause="load_error") == 1
    assert gw.cold_starts("broken") == 0
    assert gw.worker_pids("broken") == []


def test_worker_that_cannot_start(gw: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as e:
        gw.openai().completions.create(model="nostart", prompt="x", max_tokens=2)
    msg = e.value.message
    assert e.value.status_code == 503
    assert "exited with exit code 1 while loading" in msg and "its last output" in msg, msg
    assert gw.metric("zerostart_start_failures_total", model="nostart", cause="exit") == 1


def test_start_timeout(gw: Gateway) -> None:
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        gw.openai().completions.create(model="slow", prompt="x", max_tokens=2)
    assert e.value.status_code == 504 and isinstance(e.value.body, dict) and e.value.body["code"] == "model_start_timeout"
    assert "start_timeout of 0.3 s" in e.value.message and "phase" in e.value.message
    assert time.monotonic() - t0 < 5
    m = gw.model("slow")
    assert m["state"] == "zero" and m["workers"] == []
    assert gw.metric("zerostart_start_failures_total", model="slow", cause="timeout") == 1
    assert gw.worker_pids("slow") == []  # the worker that was still loading was killed
