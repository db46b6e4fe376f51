"""A worker on its own, without a gateway: its command line, and the control routes that
``zerostart coldstart`` and the gateway drive (standby, load, ready, phases, park, wake)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.serve._helpers import GREEDY, LONG_STREAM, child_env, weights_bytes


@pytest.mark.parametrize("argv, message", [
    (["--model", "m", "--reserve", "1024"], "--reserve applies to a standby worker"),
    (["--standby", "--reserve", "-1"], "--reserve must be >= 0"),
])
def test_worker_reserve_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from zerostart.serve.worker import main

    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--port", "1"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_worker_routes(tiny_model: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "zerostart.serve.worker", "--standby", "--port", str(port)],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=60)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = http.get("/zerostart/ready", params={"wait": 30})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "the worker did not come up"
                time.sleep(0.05)
        assert r.status_code == 200 and r.json()["state"] == "standby" and r.json()["device"] == "cpu", r.text

        bad = http.post("/zerostart/load", json={"model": tiny_model, "engine_options": {"max_model_lenn": 9}})
        assert bad.status_code == 400 and "max_model_lenn" in bad.json()["error"]["message"]
        assert http.post("/zerostart/load", json={"model": tiny_model, "images": "sometimes"}).status_code == 400
        assert "unknown device" in http.post("/zerostart/load", json={"model": tiny_model, "device": "tpu"}).text
        r = http.post("/zerostart/load", json={"model": tiny_model, "engine_options": {"max_model_len": 512}})
        assert r.status_code == 202 and r.json() == {"state": "loading", "model": tiny_model, "name": "tiny"}
        again = http.post("/zerostart/load", json={"model": tiny_model})
        assert again.status_code == 409 and again.json()["error"]["code"] == "not_standby"
        ready = http.get("/zerostart/ready", params={"wait": 30}).json()
        assert ready["state"] == "ready" and ready["rung"] == "standby+source" and ready["max_model_len"] == 512
        assert ready["parkable"] is True and ready["image"]["status"] == "off"
        kv = ready["kv"]  # blocks of the default budget; slots are virtual on CPU
        assert kv["paged"] is True and kv["slots"] == 32 and kv["tokens"] == kv["blocks"] * kv["block_tokens"] >= 512

        ph = http.get("/zerostart/phases").json()
        at = {p["name"]: p for p in ph["phases"]}
        assert ph["rung"] == "standby+source" and ph["requested_s"] > 0
        assert at["import"]["end_s"] <= ph["requested_s"] and at["device_init"]["end_s"] <= ph["requested_s"]
        assert all(at[n]["start_s"] >= ph["requested_s"] for n in ("read", "prepare", "warmup"))

        text = client.completions.create(model="tiny", **GREEDY).choices[0].text

        # park is refused while a request streams, and names it
        stream = client.completions.create(model="tiny", **LONG_STREAM)
        next(iter(stream))
        busy = http.post("/zerostart/park")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "busy", busy.text
        assert [(x["method"], x["path"]) for x in busy.json()["in_flight"]] == [("POST", "/v1/completions")]
        assert "POST /v1/completions" in busy.json()["error"]["message"]
        stream.close()

        deadline = time.monotonic() + 10
        while (parked := http.post("/zerostart/park")).status_code == 409:  # until the worker sees the client left
            assert time.monotonic() < deadline, parked.text
            time.sleep(0.05)
        body = parked.json()
        assert parked.status_code == 200 and body["state"] == "parked" and body["changed"] is True, body
        assert body["bytes"] >= weights_bytes(tiny_model) and body["kv_bytes"] > 0 and body["park_s"] > 0
        assert http.post("/zerostart/park").json() == {"state": "parked", "changed": False}
        assert http.get("/zerostart/ready").json()["state"] == "parked"
        refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_parked"

        woke = http.post("/zerostart/wake").json()
        assert woke["state"] == "ready" and woke["changed"] is True and woke["bytes"] == body["bytes"], woke
        ph2 = http.get("/zerostart/phases").json()
        assert ph2["rung"] == "parked" and [p["name"] for p in ph2["phases"]] == ["wake"]
        assert ph2["requested_s"] > ph["requested_s"] and ph2["phases"][0]["bytes"] == body["bytes"]
        assert ph2["load"]["rung"] == "standby+source"
        assert client.completions.create(model="tiny", **GREEDY).choices[0].text == text
    finally:
        client.close()
        http.close()
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
