"""What a request holds is given back on every exit path, for every route: the cancellation
matrix. Each route (chat, completions and responses, streamed and not; embeddings; /tokenize and
/detokenize) x {the client leaves while its request is held, or while a worker runs it; it runs
past request_timeout; the server shuts down} ends with nothing in flight and nothing queued, at
the gateway and in the worker's engine; the client-leaves cases also on a foreign backend (the
command backend: any OpenAI server). And one rule for every route: a cold start does not count
against request_timeout.

One gateway serves the whole module (its last test shuts it down). Its workers are held still
with SIGSTOP where a request must stay running or held, so that no timing of this machine
decides what is being tested; the watchdog's probe timeout is set past every such pause.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from tests.serve._helpers import Gateway, worker_client, worker_token

REQUEST_TIMEOUT = 3.0
COLD = "x-zerostart-cold-start-ms"


def _bodies(model: str, tokens: int = 500) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, path, body) of every route a generating model takes, streamed and not."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "ignore_eos": True}
    completion = {"model": model, "prompt": "once", "max_tokens": tokens, "ignore_eos": True}
    response = {"model": model, "input": "hi", "max_output_tokens": tokens}
    out = []
    for stream in (False, True):
        tag = "stream" if stream else "whole"
        out += [(f"chat/{tag}", "/v1/chat/completions", {**chat, "stream": stream}),
                (f"completions/{tag}", "/v1/completions", {**completion, "stream": stream}),
                (f"responses/{tag}", "/v1/responses", {**response, "stream": stream})]
    return out + [("tokenize", "/tokenize", {"model": model, "prompt": "hello"}),
                  ("detokenize", "/detokenize", {"model": model, "tokens": [1, 2, 3]})]


def _embedding(model: str) -> tuple[str, str, dict[str, Any]]:
    return "embeddings", "/v1/embeddings", {"model": model, "input": ["a", "b"]}


@pytest.fixture(scope="module")
def gw(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def model(name: str, **kw: Any) -> dict[str, Any]:
        return {"path": tiny_model, "name": name, "idle_timeout": 600, "stop_timeout": 1, **kw}

    g = Gateway({"server": {"stream_keepalive": 0.2, "request_timeout": REQUEST_TIMEOUT, "worker_probe_timeout": 300,
                            "shutdown_timeout": 1},
                 "models": [model("g", max_concurrency=1), model("e", max_concurrency=1, embedding={}),
                            model("t", max_concurrency=16), model("c"), model("ce", embedding={}),
                            model("f", max_concurrency=1, backend="command", command={
                                "run": [sys.executable, "-m", "zerostart.serve.worker", "--model", "{model}",
                                        "--name", "{name}", "--host", "{host}", "--port", "{port}"],
                                "ready_path": "/zerostart/ready?wait=0"})]},
                str(tmp_path_factory.mktemp("release")))
    yield g
    g.stop()


def _raw(gw: Gateway, path: str, body: dict[str, Any]) -> socket.socket:
    """A request sent whole on a connection of its own, its answer left unread."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _read_until(sock: socket.socket, marker: bytes, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {got[-300:]!r}"
        got += chunk
    return got


def _counts(gw: Gateway, name: str) -> tuple[int, int]:
    m = gw.model(name)
    return m["in_flight"], m["queued"]


def _wait(gw: Gateway, name: str, in_flight: int, queued: int, what: str) -> None:
    gw.wait_for(f"{name}: {in_flight} in flight and {queued} queued ({what})",
                lambda: _counts(gw, name) == (in_flight, queued), timeout=20)


class _Stopped:
    """A model's worker held still (SIGSTOP) for the block, and its engine idle after it."""

    def __init__(self, gw: Gateway, name: str) -> None:
        self.gw, self.name = gw, name
        if gw.model(name)["state"] != "hot":
            gw.openai().completions.create(model=name, prompt="x", max_tokens=1) if name in ("g", "t", "f") else \
                gw.openai().embeddings.create(model=name, input="x")
        self.worker = gw.model(name)["workers"][0]

    def __enter__(self) -> "_Stopped":
        os.kill(self.worker["pid"], signal.SIGSTOP)
        return self

    def __exit__(self, *exc: Any) -> None:
        os.kill(self.worker["pid"], signal.SIGCONT)
        with worker_client(self.worker["address"], worker_token(self.worker["pid"])) as w:
            self.gw.wait_for(f"{self.name}'s engine to have nothing left", lambda: w.get("/health").json() == {
                "status": "ready", "in_flight": 0, "running": 0, "waiting": 0}, timeout=20)


# -- the client leaves ----------------------------------------------------------------------------


# One case per code path runs by default (the proxy's whole and streamed answers, a stream held
# with its headers out, the Responses route both ways, embeddings); the rest of the matrix, the
# foreign backend's cases among them, with the slow tests.
_CORE = {"g:chat/whole", "g:chat/stream", "g:responses/whole", "g:responses/stream", "e:embeddings"}


def _cases() -> list[Any]:
    foreign = [("f", *case) for case in _bodies("f") if case[0].startswith(("chat/", "responses/whole"))]
    cases = [("g", *case) for case in _bodies("g")] + [("e", *_embedding("e"))] + foreign
    return [pytest.param(*case, id=f"{case[0]}:{case[1]}",
                         marks=() if f"{case[0]}:{case[1]}" in _CORE else pytest.mark.slow) for case in cases]


@pytest.mark.parametrize("model, label, path, body", _cases())
def test_a_client_that_leaves_while_its_request_runs_gives_everything_back(gw: Gateway, model: str, label: str,
                                                                            path: str, body: dict[str, Any]) -> None:
    with _Stopped(gw, model):
        sock = _raw(gw, path, body)  # taken by the (stopped) worker: it runs, and nothing comes back
        _wait(gw, model, 1, 0, f"{label} running")
        if label == "responses/stream":
            _read_until(sock, b"response.in_progress")  # its headers and first events went out
        sock.close()
        _wait(gw, model, 0, 0, f"{label} gone while running")


@pytest.mark.parametrize("model, label, path, body", _cases())
def test_a_client_that_leaves_while_its_request_is_held_gives_everything_back(gw: Gateway, model: str, label: str,
                                                                               path: str, body: dict[str, Any]) -> None:
    with _Stopped(gw, model):
        blocker = _raw(gw, *(_embedding(model)[1:] if model == "e" else ("/v1/completions", {"model": model,
                                                                                               "prompt": "x"})))
        _wait(gw, model, 1, 0, "the blocker running")
        sock = _raw(gw, path, body)  # max_concurrency 1: held behind the blocker
        _wait(gw, model, 1, 1, f"{label} held")
        if body.get("stream"):
            _read_until(sock, b": waiting for a replica")  # held with its headers out, SSE comments coming
        sock.close()
        _wait(gw, model, 1, 0, f"{label} gone while held")
        blocker.close()
        _wait(gw, model, 0, 0, "the blocker gone")


# -- request_timeout ----------------------------------------------------------------------------------


def _ask(gw: Gateway, path: str, body: dict[str, Any], answers: dict[str, Any], label: str) -> None:
    try:
        r = httpx.post(gw.url + path, json=body, timeout=60)
        answers[label] = (r.status_code, r.headers, r.text)
    except Exception as e:  # noqa: BLE001 - the test reads it
        answers[label] = e


def _in_threads(gw: Gateway, cases: list[tuple[str, str, dict[str, Any]]], answers: dict[str, Any]) -> list[threading.Thread]:
    threads = [threading.Thread(target=_ask, args=(gw, path, body, answers, label)) for label, path, body in cases]
    for t in threads:
        t.start()
    return threads


def _ended_by(answer: Any, code: str) -> bool:
    """Whether an answer is the error ``code``: a JSON error, a stream's last error event (then
    ``[DONE]``), or a Responses stream's ``response.failed``."""
    status, headers, text = answer
    if headers["content-type"].startswith("application/json"):
        return status >= 400 and json.loads(text)["error"]["code"] == code
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    if data[-1] == "[DONE]":
        return json.loads(data[-2])["error"]["code"] == code
    last = json.loads(data[-1])
    return last["type"] == "response.failed" and last["response"]["error"]["code"] == code


def test_requests_past_request_timeout_are_ended_and_give_everything_back(gw: Gateway) -> None:
    answers: dict[str, Any] = {}
    with _Stopped(gw, "t"), _Stopped(gw, "e"):
        cases = _bodies("t") + [_embedding("e")]
        threads = _in_threads(gw, cases, answers)
        _wait(gw, "t", len(cases) - 1, 0, "every route running")
        for t in threads:
            t.join(30)
        for label, _, _ in cases:
            assert _ended_by(answers[label], "request_timeout"), (label, answers[label])
        for name in ("t", "e"):
            _wait(gw, name, 0, 0, "after request_timeout")


# -- one rule for a cold start ------------------------------------------------------------------------


def test_a_cold_start_longer_than_request_timeout_fails_no_route(gw: Gateway) -> None:
    """Every route waits for its model's cold start (bounded by start_timeout), then has
    request_timeout for the answer. /v1/responses once counted the start against it."""
    answers: dict[str, Any] = {}
    cases = _bodies("c", tokens=2) + [_embedding("ce")]
    threads = _in_threads(gw, cases, answers)
    stopped: list[tuple[str, int]] = []
    deadline = time.monotonic() + 30
    while len(stopped) < 2 and time.monotonic() < deadline:  # each start is caught while its worker loads
        for name in ("c", "ce"):
            workers = gw.model(name)["workers"]
            if name not in [n for n, _ in stopped] and workers and workers[0]["pid"]:
                assert workers[0]["state"] == "starting", (name, workers)
                os.kill(workers[0]["pid"], signal.SIGSTOP)
                stopped.append((name, workers[0]["pid"]))
        time.sleep(0.01)
    time.sleep(REQUEST_TIMEOUT + 1)  # the starts now outlast request_timeout
    for _, pid in stopped:
        os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(60)
    assert len(stopped) == 2
    for label, _, body in cases:
        status, headers, text = answers[label]
        assert status == 200, (label, status, text[:300])
        if body.get("stream"):
            waited = headers[COLD] if headers[COLD] != "pending" else text.split(f": {COLD}=", 1)[1].split("\n", 1)[0]
            assert ("event: response.incomplete" in text  # its 2 tokens: max_output_tokens
                    or text.rstrip().endswith("data: [DONE]")), (label, text[-300:])
        else:
            waited = headers[COLD]
        assert float(waited) > REQUEST_TIMEOUT * 1000, (label, waited)  # the start did outlast it
    for name in ("c", "ce"):
        _wait(gw, name, 0, 0, "after the cold start")


# -- shutdown (last: it stops the module's gateway) ---------------------------------------------------


def test_shutdown_ends_held_and_running_requests_of_every_route_and_gives_everything_back(gw: Gateway) -> None:
    answers: dict[str, Any] = {}
    for name in ("g", "t", "e"):
        _Stopped(gw, name).__enter__()  # held still until the gateway kills them on its way out
    running = _in_threads(gw, [("t:" + label, path, body) for label, path, body in _bodies("t")], answers)
    blockers = _in_threads(gw, [("g:blocker", "/v1/completions", {"model": "g", "prompt": "x"}),
                                ("e:blocker", *_embedding("e")[1:])], answers)
    _wait(gw, "g", 1, 0, "the blocker running")
    _wait(gw, "e", 1, 0, "the blocker running")
    held = _in_threads(gw, [("g:" + label, path, body) for label, path, body in _bodies("g")]
                       + [("e:" + label, path, body) for label, path, body in [_embedding("e")]], answers)
    _wait(gw, "t", len(running), 0, "every route running")
    _wait(gw, "g", 1, len(held) - 1, "every route held")
    _wait(gw, "e", 1, 1, "embeddings held")
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(30)
    took = time.monotonic() - t0
    for t in running + blockers + held:
        t.join(30)
    for label, answer in sorted(answers.items()):
        assert not isinstance(answer, Exception), (label, answer)
        assert _ended_by(answer, "shutting_down"), (label, answer)
    assert took < 10, took  # shutdown_timeout (1 s), the answers, the workers killed after stop_timeout (1 s)
    deadline = time.monotonic() + 5
    while "shutdown: 0 requests" not in "".join(gw.log) and time.monotonic() < deadline:
        time.sleep(0.05)  # the log's last lines, read on after the process ended
    log = "".join(gw.log)
    assert "shutdown: 0 requests in flight, 0 queued: every lease given back" in log, gw.tail()
    assert "Traceback" not in log, gw.tail()
