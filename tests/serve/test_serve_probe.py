"""The gateway's probe of its workers, end to end with real workers: one expensive request (a
schema that takes seconds to compile) neither stalls the other streams of its worker nor gets
the worker killed, and past the budget it is a 400 naming the setting; a worker that stops
(SIGSTOP) is killed once ``worker_probe_timeout`` has passed, not before."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import openai
import pytest

from tests.serve._helpers import Gateway, pid_alive

pytestmark = pytest.mark.slow

PROBE_TIMEOUT = 20  # past the 10 s read timeout (+ 3 s exit grace) that used to decide instead


def _schema(properties: int) -> dict[str, Any]:
    """~45 bytes a property; compiling grows faster than linearly: on a quiet 2-core Zen 4, 20
    properties take 2 ms, 12,000 take 1.2 s and 16,000 take 2.7 s (llguidance refuses 18,000)."""
    names = [f"field_{i}" for i in range(properties)]
    return {"type": "object", "properties": {n: {"type": "integer"} for n in names}, "required": names,
            "additionalProperties": False}


def _structured(properties: int) -> dict[str, Any]:
    return dict(messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                response_format={"type": "json_schema", "json_schema": {"name": "big", "schema": _schema(properties)}})


@pytest.fixture(scope="module")
def busy(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    """A short probe timeout and a budget that lets a schema of seconds compile."""
    config = {"server": {"worker_probe_timeout": 1, "grammar_timeout": 300, "max_grammar_bytes": "4MiB"},
              "models": [{"path": tiny_model, "name": "m", "idle_timeout": 600, "images": "off"}]}
    g = Gateway(config, str(tmp_path_factory.mktemp("busy")))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def strict(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    """A budget of 0.1 s and 600 KiB: a schema of 12,000 properties (530 KiB) compiles in
    more than ten times that, one of 20 in a fiftieth of it, however fast the machine."""
    config = {"server": {"worker_probe_timeout": PROBE_TIMEOUT, "grammar_timeout": 0.1,
                         "max_grammar_bytes": "600KiB"},
              "models": [{"path": tiny_model, "name": "m", "idle_timeout": 600, "images": "off"},
                         {"path": tiny_model, "name": "stop", "idle_timeout": 600, "images": "off"}]}
    g = Gateway(config, str(tmp_path_factory.mktemp("strict")))
    yield g
    g.stop()


def test_an_expensive_schema_neither_stalls_other_streams_nor_kills_the_worker(busy: Gateway) -> None:
    """16,000 properties: seconds of compiling (it ran on the worker's event loop: every stream
    of the worker stood still, the probe went unanswered and the worker was killed, failing them)."""
    client = busy.openai()
    assert client.completions.create(model="m", prompt="x", max_tokens=1).choices
    pid = busy.model("m")["workers"][0]["pid"]
    gaps: list[float] = []
    streamed: list[str | None] = []  # each stream's finish_reason
    errors: list[BaseException] = []
    done = threading.Event()

    def stream() -> None:  # streams, one after another, until the schema's answer is in
        try:
            while not done.is_set():
                last, finish = time.monotonic(), None
                for chunk in client.completions.create(model="m", prompt="go", max_tokens=600, stream=True,
                                                       extra_body={"ignore_eos": True}):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last, finish = now, chunk.choices[0].finish_reason if chunk.choices else finish
                streamed.append(finish)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=stream)
    t.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        out = client.chat.completions.create(model="m", **_structured(16_000))
        took = time.monotonic() - t0
    finally:
        done.set()
        t.join(120)
    assert not errors, errors
    assert out.choices[0].message.content is not None and out.choices[0].message.content.startswith('{')  # held to the schema
    assert streamed and all(f == "length" for f in streamed), streamed  # every stream whole
    assert took > 1.5 and max(gaps) < 1.5, (took, max(gaps))  # longer than the probe timeout, no stall
    assert busy.model("m")["workers"][0]["pid"] == pid and pid_alive(pid)
    assert busy.metric("zerostart_replica_stops_total", model="m", reason="replaced") == 0


def test_a_schema_past_the_budget_is_a_400_naming_the_setting(strict: Gateway) -> None:
    client = strict.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", **_structured(12_000))  # 530 KiB, a second or more to compile
    assert "server.grammar_timeout" in e.value.message and e.value.code == "grammar_too_complex", e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", **_structured(14_000))  # 621 KiB
    assert "server.max_grammar_bytes" in e.value.message and "614400 bytes" in e.value.message, e.value.message
    assert client.chat.completions.create(model="m", **_structured(20)).choices  # small ones still are


def test_a_stopped_worker_is_killed_after_the_probe_timeout_not_before(strict: Gateway) -> None:
    client = strict.openai()
    assert client.completions.create(model="stop", prompt="x", max_tokens=1).choices
    pid = strict.model("stop")["workers"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # hung: it neither answers nor exits
    t0 = time.monotonic()
    try:
        while pid_alive(pid) and time.monotonic() - t0 < PROBE_TIMEOUT + 15:
            time.sleep(0.1)
        gone = time.monotonic() - t0
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)
    # the probe's own deadline: worker_probe_timeout; then a few seconds to tell a hang from a crash
    assert PROBE_TIMEOUT <= gone <= PROBE_TIMEOUT + 10, gone
    assert "did not answer its health probe within 20 s (server.worker_probe_timeout)" in strict.tail(200)
    strict.wait_for("the replacement counted", lambda: strict.metric("zerostart_replica_stops_total", model="stop",
                                                                     reason="replaced") == 1, timeout=10)
