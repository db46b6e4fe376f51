"""Tenants, end to end, and the limits that keep one client from another: a real gateway with
keys of its own tenants, a named tenant of two keys, an admin tenant and a key from the
environment, serving a generating and an embedding model, with the real openai client.

- A stored response, its id and its chain are its tenant's: another tenant gets the 404 of a
  missing id for GET, DELETE and previous_response_id.
- /zerostart/status, /metrics and the dashboard need an admin key; /health and /ping none.
- Workers do not inherit the gateway's keys from its environment.
- max_sequences counts embeddings' inputs; the Responses store is bounded in bytes; metadata as
  OpenAI bounds it; /v1/responses is as strictly typed as every route; a lone surrogate in any
  text is a 400 naming its field (at the gateway and at a worker); an hf:// model that HF_HUB_OFFLINE
  keeps from ever loading is a startup error.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import openai
import pytest

from zerostart.serve import ConfigError, create_app, load_config
from zerostart.serve.edge import PROXIED

from tests.serve._helpers import Gateway, worker_client, worker_token

KEYS = {"one": "key-one", "two": "key-two", "ops": "key-ops", "team1": "team-key-1", "team2": "team-key-2",
        "env": "key-from-env"}


@pytest.fixture(scope="module")
def gw(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway({"server": {"api_keys": [KEYS["one"], KEYS["two"]], "max_sequences": 8,
                            "tenants": [{"name": "ops", "keys": [KEYS["ops"]], "admin": True},
                                        {"name": "team", "keys": [KEYS["team1"], KEYS["team2"]]}],
                            "responses_store": {"max_items": 100, "max_bytes": "32KiB"}},
                 "models": [{"path": tiny_model, "name": "gen", "idle_timeout": 300},
                            {"path": tiny_model, "name": "emb", "idle_timeout": 300, "embedding": {}}]},
                str(tmp_path_factory.mktemp("tenants")), api_key=KEYS["ops"], env={"ZEROSTART_API_KEYS": KEYS["env"]})
    yield g
    g.stop()


def _http(gw: Gateway, who: str | None) -> httpx.Client:
    return httpx.Client(base_url=gw.url, timeout=60, headers={"authorization": f"Bearer {KEYS[who]}"} if who else {})


def _create(gw: Gateway, who: str, **body: Any) -> httpx.Response:
    with _http(gw, who) as c:
        return c.post("/v1/responses", json={"model": "gen", "input": "hello", "max_output_tokens": 3, **body})


# -- stored responses belong to their tenant ------------------------------------------------


def test_a_stored_response_and_its_chain_are_its_tenants_alone(gw: Gateway) -> None:
    mine = _create(gw, "one")
    assert mine.status_code == 200, mine.text
    rid = mine.json()["id"]
    missing = rid[:-6] + "000000"
    with _http(gw, "one") as one, _http(gw, "two") as two:
        assert one.get(f"/v1/responses/{rid}").json() == mine.json()
        for method in ("GET", "DELETE"):
            theirs, nothing = two.request(method, f"/v1/responses/{rid}"), two.request(method, f"/v1/responses/{missing}")
            assert theirs.status_code == nothing.status_code == 404
            assert theirs.json() == json.loads(nothing.text.replace(missing, rid))  # nothing tells them it exists
        chained = _create(gw, "two", previous_response_id=rid)
        unknown = _create(gw, "two", previous_response_id=missing)
        assert chained.status_code == unknown.status_code == 404
        assert chained.json() == json.loads(unknown.text.replace(missing, rid))
        assert chained.json()["error"]["param"] == "previous_response_id"
        assert one.get(f"/v1/responses/{rid}").status_code == 200  # their DELETE did nothing
    # its own tenant continues it, streamed too, through the openai client
    client = gw.openai(api_key=KEYS["one"])
    stream = client.responses.create(model="gen", input="and then?", previous_response_id=rid, max_output_tokens=3,
                                     stream=True)
    done = [ev for ev in stream if ev.type in ("response.completed", "response.incomplete")]
    assert done and done[0].response.previous_response_id == rid


def test_keys_of_a_configured_tenant_share_its_responses(gw: Gateway) -> None:
    rid = _create(gw, "team1").json()["id"]
    with _http(gw, "team2") as c:
        assert c.get(f"/v1/responses/{rid}").status_code == 200
        assert c.delete(f"/v1/responses/{rid}").json()["deleted"] is True
    with _http(gw, "team1") as c:
        assert c.get(f"/v1/responses/{rid}").status_code == 404


# -- who may call what -------------------------------------------------------------------------


def test_operational_routes_need_an_admin_and_probes_no_key(gw: Gateway) -> None:
    for who in ("one", "team1", "env"):
        with _http(gw, who) as c:
            assert c.get("/v1/models").status_code == 200  # every key: the API
            for path in ("/zerostart/status", "/metrics", "/zerostart/"):  # the last: the dashboard's page
                r = c.get(path)
                assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only", (who, path, r.text)
    with _http(gw, "ops") as c:
        assert c.get("/zerostart/status").status_code == c.get("/metrics").status_code == 200
        assert c.get("/zerostart/").status_code == 200
    with httpx.Client(base_url=gw.url, timeout=30) as browser:  # the dashboard's browser: a key as Basic's password
        assert browser.get("/zerostart/", auth=("me", KEYS["ops"])).status_code == 200
        assert browser.get("/zerostart/", auth=("me", KEYS["one"])).status_code == 403
    with _http(gw, None) as c:
        assert c.get("/health").status_code == c.get("/ping").status_code == 200
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.headers["x-zerostart-cold-start-ms"] == "0"


def test_workers_do_not_inherit_the_gateways_keys(gw: Gateway) -> None:
    gw.openai().completions.create(model="gen", prompt="x", max_tokens=1)
    with open(f"/proc/{gw.proc.pid}/environ", "rb") as f:
        assert b"ZEROSTART_API_KEYS=" in f.read()  # the gateway's (the env key works: above)
    for w in gw.model("gen")["workers"]:
        with open(f"/proc/{w['pid']}/environ", "rb") as f:
            env = f.read().split(b"\0")
        assert not [e for e in env if e.startswith(b"ZEROSTART_API_KEYS=")]


def test_a_worker_serves_every_proxied_route_of_the_table(gw: Gateway) -> None:
    gw.openai().completions.create(model="gen", prompt="x", max_tokens=1)
    w = gw.model("gen")["workers"][0]
    with worker_client(w["address"], worker_token(w["pid"])) as c:
        for route in PROXIED:
            r = c.post(route.path, json={})  # not a valid body: a 400, not a missing route
            assert r.status_code == 400, (route.path, r.text)


# -- limits ---------------------------------------------------------------------------------------


def test_embedding_inputs_count_against_max_sequences(gw: Gateway) -> None:
    client = gw.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="emb", input=[f"text {i}" for i in range(9)])
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "input"
    assert "max_sequences: 8" in e.value.message and "9 sequences" in e.value.message
    assert len(client.embeddings.create(model="emb", input=[f"text {i}" for i in range(8)]).data) == 8


def test_the_responses_store_is_bounded_in_bytes(gw: Gateway) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}  # 9 kB each, kept with the response
    ids = [_create(gw, "two", metadata=metadata, max_output_tokens=1).json()["id"] for _ in range(6)]
    with _http(gw, "two") as c:
        kept = [c.get(f"/v1/responses/{rid}").status_code == 200 for rid in ids]
    # 32 KiB holds three of them at most: the oldest went first, the newest stayed
    assert kept[-1] and 1 <= sum(kept) <= 3 and kept == sorted(kept), kept
    assert "32.0 KiB" in _create(gw, "two", previous_response_id=ids[0]).json()["error"]["message"]


@pytest.mark.parametrize("metadata, word", [({f"k{i}": "v" for i in range(17)}, "at most 16 pairs"),
                                            ({"k" * 65: "v"}, "at most 64 characters"),
                                            ({"k": "v" * 513}, "at most 512 characters")])
def test_metadata_is_bounded_as_openai_bounds_it(gw: Gateway, metadata: dict[str, str], word: str) -> None:
    r = _create(gw, "one", metadata=metadata)
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata" and word in r.json()["error"]["message"]


def test_metadata_at_its_bounds_is_kept(gw: Gateway) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    r = _create(gw, "one", metadata=metadata)
    assert r.status_code == 200 and r.json()["metadata"] == metadata


@pytest.mark.parametrize("field, value", [("stream", "yes"), ("temperature", "0.5"), ("max_output_tokens", 2.0),
                                          ("store", 1), ("input", 3), ("tool_choice", 1)])
def test_responses_types_are_strict(gw: Gateway, field: str, value: Any) -> None:
    r = _create(gw, "one", **{field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


_LONE = "a\\ud800b"  # as JSON text: a lone surrogate's escape


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", f'{{"model": "gen", "messages": [{{"role": "user", "content": "{_LONE}"}}]}}',
     "messages[0].content"),
    ("/v1/completions", f'{{"model": "gen", "prompt": ["ok", "{_LONE}"]}}', "prompt[1]"),
    ("/v1/embeddings", f'{{"model": "emb", "input": "{_LONE}"}}', "input"),
    ("/tokenize", f'{{"model": "gen", "prompt": "{_LONE}"}}', "prompt"),
    ("/v1/responses", f'{{"model": "gen", "input": [{{"role": "user", "content": "{_LONE}"}}]}}', "input[0].content"),
])
def test_a_lone_surrogate_anywhere_is_a_400_naming_its_field(gw: Gateway, path: str, body: str, field: str) -> None:
    with _http(gw, "one") as c:
        r = c.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(f"{field}: contains a lone"), r.text
    if path != "/v1/responses":  # a worker is its own edge: it decodes its bodies the same way
        gw.openai().completions.create(model="gen", prompt="x", max_tokens=1)
        gw.openai().embeddings.create(model="emb", input="x")
        w = gw.model("emb" if "emb" in body else "gen")["workers"][0]
        with worker_client(w["address"], worker_token(w["pid"])) as c:
            r = c.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_an_hf_model_offline_and_not_cached_is_a_startup_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"models\[0\] \(missing\).path: hf://org/missing is not in the Hugging Face cache"):
        create_app(load_config(data={"models": [{"path": "hf://org/missing", "memory_estimate": "1GiB"}]}))
