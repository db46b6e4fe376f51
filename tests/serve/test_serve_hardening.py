"""Nothing lost, no slot leaked, no unbounded work (issue 15), end to end: each item's
reproduction against a real gateway with real workers (on TCP loopback ports, so that anyone on
the host could reach them), with the real openai client, raw sockets and direct calls to the
workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve._fuzz import body as _body
from tests.serve._helpers import Gateway, pid_alive, worker_client, worker_token

# 32 sequences (every slot of the tiny model's worker) of 1000 tokens: tens of seconds here
LONG = dict(prompt="go", max_tokens=1000, n=32, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def gw(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hardening")
    dash = str(tmp / "-dash")  # a directory (and so a model name) that begins with "-"
    shutil.copytree(tiny_model, dash)
    blocked = tmp / "blocked-cache"
    blocked.mkdir()
    (blocked / "images").write_text("a file where the image store's directory would go")
    config = {
        "server": {"worker_transport": "tcp", "stream_keepalive": 0.25, "request_timeout": 120,
                   "worker_probe_timeout": 2, "header_timeout": 1, "body_timeout": 2, "max_body_bytes": "2MiB",
                   "max_sequences": 64},
        "models": [
            {"path": tiny_model, "name": "m", "idle_timeout": 300},
            {"path": tiny_model, "name": "hang", "idle_timeout": 300},
            {"path": tiny_model, "name": "trust", "idle_timeout": 300},
            {"path": dash, "idle_timeout": 300},
            {"path": tiny_model, "name": "imgfail", "images": "write", "idle_timeout": 300,
             "env": {"ZEROSTART_CACHE_DIR": str(blocked)}},
        ]}
    g = Gateway(config, str(tmp))
    yield g
    g.stop()


def _worker(gw: Gateway, model: str, token: bool = True) -> httpx.Client:
    w = gw.model(model)["workers"][0]
    return worker_client(w["address"], worker_token(w["pid"]) if token else None)


def _warm(gw: Gateway, model: str) -> None:
    gw.openai().completions.create(model=model, prompt="x", max_tokens=1)


def _settled(gw: Gateway, model: str, timeout: float = 10.0) -> None:
    """Nothing in flight or queued for ``model``, at the gateway and in its worker's engine."""
    def idle() -> bool:
        m = gw.model(model)
        if m["in_flight"] or m["queued"]:
            return False
        with _worker(gw, model) as w:
            h = w.get("/health").json()
        return h["in_flight"] == 0 and h.get("running", 0) == 0 and h.get("waiting", 0) == 0

    gw.wait_for(f"{model} to have nothing in flight", idle, timeout=timeout)


# -- 1: one request cannot jam a model -------------------------------------------------------------


def test_a_seed_past_64_bits_is_a_400_and_jams_nothing(gw: Gateway) -> None:
    client = gw.openai()
    for temperature in (0.0, 1.0):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="m", prompt="x", max_tokens=2, seed=2**64, temperature=temperature)
        assert isinstance(e.value.body, dict) and e.value.body["param"] == "seed" and "seed" in e.value.message
    # the edge of OpenAI's range, with n choices (seed + i per choice, past 2**63) is served
    out = client.completions.create(model="m", prompt="x", max_tokens=2, seed=2**63 - 1, n=3)
    assert len(out.choices) == 3
    with _worker(gw, "m") as w:  # the worker's own parser refuses it too (no gateway in between)
        r = w.post("/v1/completions", json={"model": "m", "prompt": "x", "seed": 2**64})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    _settled(gw, "m")


# -- 4: bounded work per request ------------------------------------------------------------------


def test_a_body_past_max_body_bytes_is_a_413(gw: Gateway) -> None:
    big = json.dumps({"model": "m", "prompt": "x" * (2 * 1024 * 1024)}).encode()
    t0 = time.monotonic()
    r = gw.http.post("/v1/completions", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large" and time.monotonic() - t0 < 5
    chunked = gw.http.post("/v1/completions", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    assert chunked.status_code == 413
    assert gw.metric("zerostart_requests_total", model="unknown", status="413") == 2


def test_prompts_times_n_past_max_sequences_is_a_400_naming_n(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        gw.openai().completions.create(model="m", prompt=["a"] * 17, n=4, max_tokens=1)  # 68 > 64
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "n"
    assert "max_sequences" in e.value.message and "68" in e.value.message


def test_a_large_prompt_is_answered_and_its_worker_keeps_serving(gw: Gateway) -> None:
    """A prompt of ~1.9 MB takes seconds to tokenize. Its worker's event loop once stood still
    meanwhile: the watchdog (2 s here) found it hung and killed it. Now the others are served
    and the big one gets its 400 (test_serve_worker.py measures the event loop itself)."""
    _warm(gw, "m")
    pid = gw.model("m")["workers"][0]["pid"]
    errors: list[BaseException] = []

    def big() -> None:
        try:
            gw.openai().completions.create(model="m", prompt="hello world, tokens " * 95_000, max_tokens=1)
        except BaseException as e:  # noqa: BLE001 - looked at below
            errors.append(e)

    t = threading.Thread(target=big)
    t.start()
    served = 0
    while t.is_alive():
        assert gw.openai().completions.create(model="m", prompt="small", max_tokens=1).choices
        served += 1
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], openai.BadRequestError), errors
    assert "maximum context length" in errors[0].message and served >= 1
    assert gw.model("m")["workers"][0]["pid"] == pid  # not taken for hung
    _settled(gw, "m")


def test_a_wide_request_does_not_starve_a_later_one(gw: Gateway) -> None:
    """64 sequences of one request fill the worker's 32 slots twice over. A request sent while
    the first 32 run gets a slot with the second wave (it has none running; the wide one has),
    instead of after all 64: it is done while the wide one still has a wave to go."""
    _warm(gw, "m")
    done: dict[str, float] = {}

    def wide() -> None:
        gw.openai().completions.create(model="m", prompt="a", n=64, max_tokens=150, extra_body={"ignore_eos": True})
        done["wide"] = time.monotonic()

    t = threading.Thread(target=wide)
    t.start()
    with _worker(gw, "m") as w:
        gw.wait_for("the first wave to run", lambda: w.get("/health").json().get("waiting") == 32)
    gw.openai().completions.create(model="m", prompt="b", max_tokens=1)
    done["late"] = time.monotonic()
    t.join(120)
    assert done["late"] < done["wide"], done
    _settled(gw, "m")


# -- 5: abandoned work stops -------------------------------------------------------------------


def test_a_client_that_leaves_a_non_streamed_request_frees_its_slot(gw: Gateway) -> None:
    _warm(gw, "m")
    body = {"model": "m", **{k: v for k, v in LONG.items() if k != "extra_body"}, "ignore_eos": True}
    with socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))) as sock:
        raw = json.dumps(body).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(raw), raw))
        gw.wait_for("the request to be generating", lambda: _running(gw, "m") == 32, timeout=10)
    t0 = time.monotonic()  # the client is gone
    _settled(gw, "m", timeout=5)
    assert time.monotonic() - t0 < 3  # long before its 32 x 1000 tokens
    assert gw.metric("zerostart_requests_total", model="m", status="499") >= 1


def _running(gw: Gateway, model: str) -> int:
    with _worker(gw, model) as w:
        return int(w.get("/health").json().get("running", 0))


# -- 6: workers answer only their gateway --------------------------------------------------------


def test_a_worker_answers_only_its_gateway(gw: Gateway, tmp_path) -> None:
    _warm(gw, "m")
    address = gw.model("m")["workers"][0]["address"]
    assert address.startswith("http://127.0.0.1:")  # worker_transport: tcp
    for token in (None, "wrong"):
        with worker_client(address, token) as anyone:
            for method, path, body in [("POST", "/v1/completions", {"model": "m", "prompt": "x"}),
                                       ("POST", "/zerostart/park", None), ("POST", "/zerostart/wake", None),
                                       ("POST", "/zerostart/load", {"model": str(tmp_path)}),
                                       ("GET", "/zerostart/ready", None), ("GET", "/health", None)]:
                r = anyone.request(method, path, json=body)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_worker_token", (path, r.text)
    assert gw.model("m")["state"] == "hot"
    assert gw.openai().completions.create(model="m", prompt="x", max_tokens=1).choices


def test_a_worker_moved_behind_the_gateway_s_back_is_replaced(gw: Gateway) -> None:
    """Even with the token (read from the worker's environment, as only its own user can), a
    park the gateway did not ask for does not leave the model answering 503s: the gateway
    replaces the worker, and the next request is served."""
    _warm(gw, "trust")
    pid = gw.model("trust")["workers"][0]["pid"]
    with _worker(gw, "trust") as w:
        assert w.post("/zerostart/park").json()["state"] == "parked"
    with pytest.raises(openai.APIStatusError) as e:
        gw.openai().completions.create(model="trust", prompt="x", max_tokens=1)
    assert e.value.status_code == 503 and isinstance(e.value.body, dict) and e.value.body["code"] == "worker_replaced"
    gw.wait_for("the worker to be killed", lambda: not pid_alive(pid))
    out = gw.openai().completions.with_raw_response.create(model="trust", prompt="x", max_tokens=1)
    assert gw.model("trust")["workers"][0]["pid"] != pid and out.parse().choices
    assert gw.metric("zerostart_replica_stops_total", model="trust", reason="replaced") == 1


# -- 7: bad input is a 4xx naming the field, on any route ------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=_body, chat=st.booleans(), model_m=st.booleans())
def test_fuzzed_bodies_get_json_4xx_and_never_a_500(gw: Gateway, body: dict[str, Any], chat: bool,
                                                    model_m: bool) -> None:
    body = dict(body)
    if model_m:
        body["model"] = "m"
    for key, cap in (("max_tokens", 2), ("max_completion_tokens", 2), ("n", 2)):  # keep the valid ones short
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > cap:
            body[key] = cap
    if chat:
        body.setdefault("max_completion_tokens", 2)  # else a chat goes on to the end of the context
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = gw.http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code != 500 and r.headers["content-type"].startswith(("application/json", "text/event-stream"))
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"]
    assert gw.http.get("/health").status_code == 200  # the same keep-alive connection still works


def test_a_worker_s_own_routes_answer_bad_input_with_json_4xx(gw: Gateway) -> None:
    _warm(gw, "m")
    with _worker(gw, "m") as w:
        for path, raw in [("/v1/completions", b"{not json"), ("/v1/completions", b"[" * 50_000),
                          ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": 3}]}'),
                          ("/v1/completions", b'{"model": "m", "prompt": [1, 99999999]}'),
                          ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": "3"}'),
                          ("/zerostart/load", b'{"model": 3}'), ("/zerostart/ready?wait=soon", b"")]:
            r = w.post(path, content=raw) if raw else w.get(path)
            assert r.headers["content-type"] == "application/json", (path, r.text)
            if r.status_code != 200:
                assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (path, r.status_code, r.text)
        assert w.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_strings_for_numbers_are_refused_as_openai_does(gw: Gateway) -> None:
    r = gw.http.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": "3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


# -- 9: the smaller ones ------------------------------------------------------------------------


def test_a_model_whose_directory_and_name_begin_with_a_dash(gw: Gateway) -> None:
    assert "-dash" in [m.id for m in gw.openai().models.list().data]
    assert gw.openai().completions.create(model="-dash", prompt="x", max_tokens=1).choices


def test_a_failed_background_image_write_shows_in_status_and_metrics(gw: Gateway) -> None:
    _warm(gw, "imgfail")

    def image() -> dict[str, Any]:
        return gw.model("imgfail")["last_cold_start"]["image"]

    gw.wait_for("the image write to end", lambda: image()["status"] not in ("queued", "writing"), timeout=20)
    assert image()["status"] == "write_failed" and "images" in image()["error"], image()
    assert gw.metric("zerostart_image_writes_total", model="imgfail", status="write_failed") == 1
    assert "writing its ready image" in gw.tail(80)


# -- 10: timeouts everywhere -------------------------------------------------------------------------


def test_a_hung_worker_is_killed_and_its_request_answered(gw: Gateway) -> None:
    _warm(gw, "hang")
    pid = gw.model("hang")["workers"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # hung: neither answers nor exits
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        gw.openai().completions.create(model="hang", prompt="x", max_tokens=1)
    assert e.value.status_code == 502 and "health probe within 2 s" in e.value.message
    assert time.monotonic() - t0 < 7  # probe timeout 2 s, probed every 1 s
    gw.wait_for("the hung worker to be gone", lambda: not pid_alive(pid), timeout=5)
    assert gw.openai().completions.create(model="hang", prompt="x", max_tokens=1).choices  # a new worker
    assert gw.metric("zerostart_replica_stops_total", model="hang", reason="replaced") == 1


def test_a_slowloris_of_400_connections_does_not_hold_the_gateway(gw: Gateway) -> None:
    _warm(gw, "m")
    port = int(gw.url.rsplit(":", 1)[1])
    slow = []
    try:
        for _ in range(400):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")  # and then a byte now and then
            slow.append(s)
        latencies = []
        for i in range(10):
            for s in slow[i::10]:
                try:
                    s.sendall(b"x")
                except OSError:
                    pass
            t0 = time.monotonic()
            gw.openai().completions.create(model="m", prompt="x", max_tokens=1)
            latencies.append(time.monotonic() - t0)
        assert max(latencies) < 2.0, latencies
        time.sleep(1.5)  # past header_timeout (1 s) for every one of them
        still_open = 0
        for s in slow:
            s.settimeout(0.5)
            try:
                s.recv(65536)  # a 408, or nothing: closed either way
            except ConnectionResetError:
                pass
            except TimeoutError:
                still_open += 1
        assert still_open == 0
    finally:
        for s in slow:
            s.close()


# -- leaked-slot symptoms -------------------------------------------------------------------------


def test_status_and_metrics_show_in_flight_per_replica_and_the_oldest_age(gw: Gateway) -> None:
    _warm(gw, "m")
    pid = gw.model("m")["workers"][0]["pid"]
    t = threading.Thread(target=lambda: gw.http.post(
        "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1000, "ignore_eos": True}, timeout=60))
    t.start()
    gw.wait_for("a request in flight", lambda: gw.model("m")["in_flight"] == 1)
    # the worker held still (within worker_probe_timeout), so the request cannot finish first
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.0)
        m = gw.model("m")
        assert m["workers"][0]["in_flight"] == 1 and m["workers"][0]["oldest_in_flight_s"] >= 1.0
        assert m["oldest_in_flight_s"] >= 1.0
        assert gw.metric("zerostart_replica_in_flight", model="m", pid=str(pid)) == 1
        assert gw.metric("zerostart_oldest_in_flight_seconds", model="m") >= 1.0
    finally:
        os.kill(pid, signal.SIGCONT)
    t.join(60)
    _settled(gw, "m")
    assert gw.metric("zerostart_oldest_in_flight_seconds", model="m") == 0.0
