"""Shutdown (issue 15, item 8): SIGTERM with requests longer than shutdown_timeout ends them
cleanly and on time, and a gateway killed outright leaves nothing the next one does not clean."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx

from tests.serve._helpers import Gateway, pid_alive

LONG = {"prompt": "go", "max_tokens": 1000, "n": 16, "ignore_eos": True}  # far longer than 2 s here


def _socket_dir(gw: Gateway, model: str) -> str:
    return os.path.dirname(gw.model(model)["workers"][0]["address"].removeprefix("unix:"))


def test_sigterm_ends_requests_past_shutdown_timeout_cleanly_and_on_time(tiny_model: str, tmp_path) -> None:
    gw = Gateway({"server": {"shutdown_timeout": 2}, "models": [{"path": tiny_model, "name": "m"}]}, str(tmp_path),
                 env={"TMPDIR": str(tmp_path)})
    try:
        gw.openai().completions.create(model="m", prompt="x", max_tokens=1)
        pids, sockets = [w["pid"] for w in gw.model("m")["workers"]], _socket_dir(gw, "m")
        answers: dict[str, httpx.Response] = {}

        def ask(name: str, body: dict) -> None:
            answers[name] = httpx.post(gw.url + "/v1/completions", json={"model": "m", **LONG, **body}, timeout=60)

        threads = [threading.Thread(target=ask, args=("whole", {})),
                   threading.Thread(target=ask, args=("stream", {"stream": True}))]
        for t in threads:
            t.start()
        gw.wait_for("both requests in flight", lambda: gw.model("m")["in_flight"] == 2)
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.wait(30)
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
    finally:
        gw.stop()
    assert 2.0 <= took < 5.0, took  # the 2 s grace, then out (it once took twice the timeout)
    whole = answers["whole"]
    assert whole.status_code == 503 and whole.headers["content-type"] == "application/json"
    assert whole.json()["error"]["code"] == "shutting_down"
    stream = answers["stream"]
    events = [e for e in stream.text.split("\n\n") if e.startswith("data: ")]
    assert len(events) > 2 and events[-1] == "data: [DONE]"  # tokens, then the error, then [DONE]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert not any(pid_alive(p) for p in pids)
    assert not os.path.exists(sockets)
    log = "".join(gw.log)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, gw.tail()


def test_a_killed_gateway_s_sockets_are_removed_by_the_next_one(tiny_model: str, tmp_path) -> None:
    env = {"TMPDIR": str(tmp_path)}
    os.makedirs(tmp_path / "a")
    first = Gateway({"models": [{"path": tiny_model, "name": "m"}]}, str(tmp_path / "a"), env=env)
    try:
        first.openai().completions.create(model="m", prompt="x", max_tokens=1)
        worker, left = first.model("m")["workers"][0]["pid"], _socket_dir(first, "m")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    assert os.path.isdir(left)  # a gateway killed outright cleans nothing up ...
    deadline = time.monotonic() + 20
    while pid_alive(worker) and time.monotonic() < deadline:  # ... its workers see their stdin close and go
        time.sleep(0.1)
    assert not pid_alive(worker)
    os.makedirs(tmp_path / "b")
    second = Gateway({"models": [{"path": tiny_model, "name": "m"}]}, str(tmp_path / "b"), env=env)
    try:
        assert not os.path.exists(left)  # ... and the next gateway removes what it left
        second.wait_for("the log to say so", lambda: "removed 1 socket directory" in second.tail())
    finally:
        second.stop()
