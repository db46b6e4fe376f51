"""request_timeout (issue 15, item 10): a request that runs past it is ended (504, or for a
stream an SSE error event and [DONE]) and its worker stops generating. The worker is held still
with SIGSTOP, so that the request outlasts the deadline on any machine; the watchdog's probe
timeout is set past the deadline so that it does not take the worker for hung first."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx

from tests.serve._helpers import Gateway, worker_client, worker_token

BODY = {"model": "m", "prompt": "go", "max_tokens": 500, "ignore_eos": True}


def test_a_request_past_request_timeout_is_ended_and_its_worker_stops(tiny_model: str, tmp_path) -> None:
    gw = Gateway({"server": {"request_timeout": 3, "worker_probe_timeout": 60},
                  "models": [{"path": tiny_model, "name": "m"}]}, str(tmp_path))
    try:
        gw.openai().completions.create(model="m", prompt="x", max_tokens=1)
        w = gw.model("m")["workers"][0]
        answers: dict[str, httpx.Response] = {}

        def ask(name: str, body: dict) -> None:
            answers[name] = httpx.post(gw.url + "/v1/completions", json={**BODY, **body}, timeout=30)

        threads = [threading.Thread(target=ask, args=(name, body))
                   for name, body in (("whole", {}), ("stream", {"stream": True}))]
        for t in threads:
            t.start()
        gw.wait_for("both in flight", lambda: gw.model("m")["in_flight"] == 2)
        with worker_client(w["address"], worker_token(w["pid"])) as c:
            gw.wait_for("tokens flowing", lambda: c.get("/health").json()["running"] == 2)
            os.kill(w["pid"], signal.SIGSTOP)  # nothing more comes from the worker: both outlast the deadline
            try:
                for t in threads:
                    t.join(15)
            finally:
                os.kill(w["pid"], signal.SIGCONT)
            whole, stream = answers["whole"], answers["stream"]
            assert whole.status_code == 504 and whole.json()["error"]["code"] == "request_timeout"
            assert "server.request_timeout (3 s)" in whole.json()["error"]["message"]
            events = [e for e in stream.text.split("\n\n") if e.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
            # the gateway closed both upstream requests: woken up, the worker drops them
            gw.wait_for("the worker's engine to be idle", lambda: c.get("/health").json() == {
                "status": "ready", "in_flight": 0, "running": 0, "waiting": 0}, timeout=10)
        assert gw.model("m")["in_flight"] == 0
        assert gw.metric("zerostart_requests_total", model="m", status="504") == 1
        assert gw.metric("zerostart_requests_total", model="m", status="stream_error") == 1
    finally:
        gw.stop()
