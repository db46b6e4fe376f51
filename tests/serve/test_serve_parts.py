"""The gateway's pieces on their own: the lifecycle table, memory estimates and eviction order,
pre-warm windows, request validation, the public surface, and the no-torch rule."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import safetensors.torch
import torch

import zerostart.serve
from zerostart import weights
from zerostart.serve._config import ModelConfig, PrewarmWindow
from zerostart.serve.edge import BadRequest
from zerostart.serve.edge import ChatCompletionRequest, CompletionRequest, parse_request
from zerostart.serve.gateway._memory import Budget, estimate_bytes
from zerostart.serve.gateway._prewarm import is_open, next_change
from zerostart.serve.gateway._state import TRANSITIONS, State, TransitionError, check, model_state

from tests.serve._helpers import child_env

# -- lifecycle --------------------------------------------------------------------------------


def test_transitions_are_exactly_the_documented_edges() -> None:
    allowed = {(a, b) for a, dsts in TRANSITIONS.items() for b in dsts}
    assert allowed == {
        (State.ZERO, State.STARTING), (State.STARTING, State.HOT), (State.STARTING, State.ZERO),
        (State.HOT, State.PARKING), (State.HOT, State.STOPPING), (State.HOT, State.ZERO),
        (State.PARKING, State.PARKED), (State.PARKING, State.HOT), (State.PARKING, State.STOPPING),
        (State.PARKING, State.ZERO),
        (State.PARKED, State.WAKING), (State.PARKED, State.STOPPING), (State.PARKED, State.ZERO),
        (State.WAKING, State.HOT), (State.WAKING, State.STOPPING), (State.WAKING, State.ZERO),
        (State.STOPPING, State.ZERO),
    }
    for a in State:
        for b in State:
            if (a, b) in allowed:
                check(a, b)
            else:
                with pytest.raises(TransitionError, match=f"{a.value} -> {b.value}"):
                    check(a, b)
    # every edge is explained in the module's docstring, next to the table
    doc = sys.modules[State.__module__].__doc__ or ""
    for a, b in allowed:
        assert f"{a.value:<8} -> {b.value}" in doc, (a, b)


def test_model_state_summarizes_replicas() -> None:
    assert model_state([]) is State.ZERO
    assert model_state([State.STOPPING]) is State.STOPPING
    assert model_state([State.STOPPING, State.STARTING]) is State.STARTING
    assert model_state([State.STARTING, State.HOT, State.STOPPING]) is State.HOT
    assert model_state([State.PARKED, State.STOPPING]) is State.PARKED
    assert model_state([State.PARKED, State.STARTING]) is State.STARTING
    assert model_state([State.PARKED, State.WAKING]) is State.WAKING
    assert model_state([State.PARKING]) is State.PARKING


# -- memory -----------------------------------------------------------------------------------


def test_estimate_from_headers_matches_the_tensors(tmp_path) -> None:
    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(7, dtype=torch.float32),
               "ids": torch.zeros(4, dtype=torch.int64)}
    path = str(tmp_path / "m.safetensors")
    safetensors.torch.save_file(tensors, path)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert weights.resolve(path).nbytes == stored
    # cast floats to the load dtype; integer tensors stay as stored
    assert estimate_bytes(ModelConfig(path=path, dtype="bfloat16")) == 15 * 2 + 7 * 2 + 4 * 8
    assert estimate_bytes(ModelConfig(path=path, dtype="float32")) == 15 * 4 + 7 * 4 + 4 * 8
    assert estimate_bytes(ModelConfig(path=path)) == 15 * 4 + 7 * 4 + 4 * 8  # cpu loads float32
    assert estimate_bytes(ModelConfig(path=path, device="cuda")) == 15 * 2 + 7 * 2 + 4 * 8
    assert estimate_bytes(ModelConfig(path=path, dtype="float16", kv_cache_bytes="1KiB")) == 15 * 2 + 7 * 2 + 32 + 1024
    assert estimate_bytes(ModelConfig(path=path, memory_estimate="1GiB")) == 2**30
    with pytest.raises(weights.WeightsError):
        estimate_bytes(ModelConfig(path=str(tmp_path / "missing")))


def test_budget_accounting() -> None:
    b = Budget({"cpu": 100, "cuda:0": None})
    assert b.fits("cpu", 100) and not b.fits("cpu", 101) and b.fits("cuda:0", 10**15)
    b.reserve("cpu", 60)
    assert b.used("cpu") == 60 and not b.fits("cpu", 41) and b.fits("cpu", 40)
    b.release("cpu", 60)
    with pytest.raises(RuntimeError):
        b.release("cpu", 1)


# -- pre-warm windows -------------------------------------------------------------------------


def test_prewarm_windows() -> None:
    utc = timezone.utc
    weekday_8am = [PrewarmWindow(cron="0 8 * * 1-5", duration="2h")]
    monday = datetime(2024, 6, 3, tzinfo=utc)
    assert not is_open(weekday_8am, monday.replace(hour=7, minute=59))
    assert is_open(weekday_8am, monday.replace(hour=8))
    assert is_open(weekday_8am, monday.replace(hour=9, minute=59))
    assert not is_open(weekday_8am, monday.replace(hour=10))
    assert not is_open(weekday_8am, datetime(2024, 6, 8, 9, tzinfo=utc))  # Saturday
    assert next_change(weekday_8am, monday.replace(hour=7)) == monday.replace(hour=8)
    assert next_change(weekday_8am, monday.replace(hour=9)) == monday.replace(hour=10)
    assert next_change(weekday_8am, monday.replace(hour=11)) == monday.replace(hour=8) + timedelta(days=1)
    seconds = [PrewarmWindow(cron="* * * * * */10", duration=3)]  # six fields: seconds last
    t = datetime(2024, 6, 3, 8, 0, 1, tzinfo=utc)
    assert is_open(seconds, t) and next_change(seconds, t) == t.replace(second=3)
    assert not is_open(seconds, t.replace(second=5)) and next_change(seconds, t.replace(second=5)) == t.replace(second=10)
    assert next_change([], t) is None and not is_open([], t)


# -- request bodies ---------------------------------------------------------------------------


def _bad(schema, body) -> BadRequest:
    with pytest.raises(BadRequest) as e:
        parse_request(schema, json.dumps(body).encode())
    return e.value


def test_request_validation() -> None:
    ok = parse_request(ChatCompletionRequest, json.dumps({
        "model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                                   {"role": "user", "content": "hi"}],
        "temperature": None, "stop": "x", "keep_alive": "5m", "max_completion_tokens": 9}).encode())
    assert isinstance(ok, ChatCompletionRequest)
    assert ok.temperature == 1.0 and ok.stop_list == ["x"] and ok.keep_alive_seconds == 300 and ok.max_new_tokens == 9
    assert ok.template_messages()[0] == {"role": "system", "content": "be brief"}
    c = parse_request(CompletionRequest, b'{"model": "m", "prompt": [1, 2, 3]}')
    assert isinstance(c, CompletionRequest) and c.prompts() == [[1, 2, 3]] and c.max_new_tokens == 16
    c = parse_request(CompletionRequest, b'{"model": "m", "prompt": ["a", "b"]}')
    assert isinstance(c, CompletionRequest) and c.prompts() == ["a", "b"]

    assert _bad(CompletionRequest, {"model": "m"}).message.startswith("prompt: this field is required")
    e = _bad(CompletionRequest, {"model": "m", "prompt": "x", "top_p": 0})
    assert e.param == "top_p" and e.model == "m"
    assert "logprobs" in _bad(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 21}).message
    assert "max_tokens: 0 needs echo" in _bad(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 0}).message
    c = parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "max_tokens": 0, "echo": true, "logprobs": 1}')
    assert isinstance(c, CompletionRequest) and (c.max_new_tokens, c.token_logprobs, c.prompt_logprobs) == (0, 1, 1)
    assert "logit_bias: not supported" in _bad(CompletionRequest, {"model": "m", "prompt": "x",
                                                                   "logit_bias": {"1": 2}}).message
    assert "tools" in _bad(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                   "tools": [{"type": "function"}]}).message
    img = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert "messages[0].content" in _bad(ChatCompletionRequest, img).message
    assert "keep_alive" in _bad(CompletionRequest, {"model": "m", "prompt": "x", "keep_alive": "later"}).message
    assert "stop" in _bad(CompletionRequest, {"model": "m", "prompt": "x", "stop": [""]}).message
    assert "non-negative" in _bad(CompletionRequest, {"model": "m", "prompt": [1, -2]}).message
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_request(CompletionRequest, b"{")
    with pytest.raises(BadRequest, match="JSON object"):
        parse_request(CompletionRequest, b"[1]")
    # fields of newer SDKs that change nothing here are accepted
    assert parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "store": false, "metadata": {}}')


# -- the package ------------------------------------------------------------------------------


def test_public_surface() -> None:
    assert zerostart.serve.__all__ == sorted([
        "ConfigError", "DEMO_NAME", "DeviceConfig", "Fleet", "ModelConfig", "PrewarmWindow", "ServeConfig",
        "ServerConfig", "State", "TRANSITIONS", "create_app", "ensure_demo_model", "load_config",
        # what zerostart.cluster builds on: its config sections (the API's edge is zerostart.serve.edge)
        "ClusterConfig", "IngressConfig", "PlacementConfig", "PoolConfig"])
    for name in zerostart.serve.__all__:
        assert getattr(zerostart.serve, name) is not None


def test_the_gateway_never_imports_torch(tmp_path) -> None:
    """Build the gateway app with a model configured, and serve a request to it (no worker
    needed for /v1/models, /metrics and /zerostart/status), all in a fresh interpreter."""
    ckpt = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4)}, str(ckpt))
    code = f"""
import sys
import zerostart.cli, zerostart.serve._cli
from starlette.testclient import TestClient
from zerostart.serve import create_app, load_config
app = create_app(load_config(data={{"models": [{{"path": {str(ckpt)!r}}}]}}))
with TestClient(app) as client:
    assert client.get("/v1/models").json()["data"][0]["id"] == "m"
    assert "zerostart_queue_length" in client.get("/metrics").text
    assert client.get("/zerostart/status").json()["models"][0]["state"] == "zero"
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "safetensors", "transformers"))
print(heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_gateway_sizes_gguf_and_hub_models_without_torch(tmp_path) -> None:
    """A GGUF file's memory estimate comes from its tensor table (Q8_0 matrices held as int8
    with a float16 scale per 32, unless quantize: none; the rest as float32), an hf:// model's
    from the hub cache (none yet here: known after its first load); neither imports torch nor
    asks a network."""
    from tests.weights._gguf_files import write_gguf

    tiny = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "zerostart", "demo-model", "--out", str(tiny), "--size", "tiny"],
                   check=True, env=child_env(), capture_output=True)
    cfg = json.loads((tiny / "config.json").read_text())
    gguf = write_gguf(str(tmp_path / "tiny.gguf"), cfg, {n: t.float() for n, t in weights.load(str(tiny)).items()},
                      str(tiny), qtype="Q8_0")
    table = weights.open_gguf(gguf).tensors
    numel = sum(t.numel for t in table)
    q8 = [t for t in table if t.qtype == "Q8_0"]
    assert q8 and all(len(t.shape) == 2 for t in q8)
    held = sum(t.numel + t.numel // 32 * 2 for t in q8) + sum(t.numel * 4 for t in table if t.qtype != "Q8_0")
    # the engine's arena for the same file holds those bytes (plus each tensor's alignment)
    arena = weights.load_arena(gguf, "cpu", dtype=torch.float32, keep_quantized=True)
    assert held <= arena.nbytes < held + 4096 * len(table), (held, arena.nbytes)
    # no hub to ask (a closed port): asking it would fail the start (HF_HUB_OFFLINE would too: test_serve_tenants.py)
    env = {**child_env(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    code = f"""
import sys
from starlette.testclient import TestClient
from zerostart.serve import create_app, load_config
app = create_app(load_config(data={{"models": [{{"path": {gguf!r}, "dtype": "float32"}}, {{"path": "hf://org/m"}},
                                               {{"name": "flat", "path": {gguf!r}, "quantize": "none", "dtype": "float32"}}]}}))
with TestClient(app) as client:
    models = {{m["name"]: m for m in client.get("/zerostart/status").json()["models"]}}
    print(models["tiny"]["memory_estimate_bytes"], models["m"]["memory_estimate_bytes"], models["flat"]["memory_estimate_bytes"])
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    sizes, heavy = out.stdout.strip().splitlines()
    assert sizes == f"{held} None {numel * 4}" and heavy == "[]"


# -- moving idle replicas down: park_after, idle_timeout, and a policy's rungs -----------------


class _FixedPolicy:
    """A policy that always gives the same decision (the fleet's side of the interface)."""

    def __init__(self, decision, rungs) -> None:
        self.name, self.rungs, self.decision = "fixed", rungs, decision

    def observe_arrival(self, model: str, t: float) -> None: ...

    def observe_completion(self, model: str, t: float) -> None: ...

    def decide(self, view, now: float):
        return self.decision


def _replica(cfg: ModelConfig, state: State, last_active: float, keep_alive: float | None = None):
    """A replica whose last request (asking for ``keep_alive``; None: idle_timeout) ended at ``last_active``."""
    from zerostart.serve._config import ServerConfig
    from zerostart.serve.backends import ZerostartWorker
    from zerostart.serve.gateway._replica import Replica

    r = Replica(cfg, ZerostartWorker(cfg, ServerConfig(), "/tmp"))
    r.state, r.last_active = state, last_active
    r.hold(last_active, keep_alive)
    return r


def test_next_move_of_the_default_policy() -> None:
    """Without a keep_alive_policy the fixed timeout ttl:<idle_timeout>,park=<park_after>
    decides: it parks park_after after the last request and stops idle_timeout after it. Each
    move is asked for when its time comes; until then the replica stays, to be looked at then."""
    from zerostart.serve.gateway._model import Model, policy_for

    cfg = ModelConfig(path="/x", park_after=5, idle_timeout=60)
    m = Model(cfg, 100, policy_for(cfg))
    assert m.parkable and m.can_park and m.policy.name == "ttl:60,park=5"
    hot = _replica(m.cfg, State.HOT, 10.0)
    assert m.next_move(hot, 11.0) == (15.0, "stay") and m.next_move(hot, 15.0) == (15.0, "park")
    parked = _replica(m.cfg, State.PARKED, 10.0)  # idle_timeout from the last request
    assert m.next_move(parked, 16.0) == (70.0, "stay") and m.next_move(parked, 70.0) == (70.0, "stop")
    # the requests asked for a keep_alive shorter than park_after: it stops instead
    short = _replica(m.cfg, State.HOT, 10.0, keep_alive=3.0)
    assert m.next_move(short, 11.0) == (13.0, "stay") and m.next_move(short, 13.0) == (13.0, "stop")
    cfg = ModelConfig(path="/x", idle_timeout=60)
    never = Model(cfg, 100, policy_for(cfg))
    assert not never.parkable and never.next_move(_replica(never.cfg, State.HOT, 0.0), 1.0) == (60.0, "stay")
    assert never.next_move(_replica(never.cfg, State.HOT, 0.0), 60.0) == (60.0, "stop")
    cfg = ModelConfig(path="/x", park_after=5, idle_timeout=60)
    m2 = Model(cfg, 100, policy_for(cfg))
    m2.park_refused = "no VMM"  # a worker said it cannot park: stop at the keep-alive instead
    assert m2.next_move(_replica(m2.cfg, State.HOT, 0.0), 1.0) == (60.0, "stay")
    assert m2.next_move(_replica(m2.cfg, State.HOT, 0.0), 60.0) == (60.0, "stop")
    with pytest.raises(ValueError, match="park_after is set but parkable is false"):
        ModelConfig(path="/x", park_after=5, parkable=False)


def test_the_default_keep_alive_is_the_policy_the_simulator_runs() -> None:
    """A model without a keep_alive_policy is decided by a policy all the same: the fixed timeout
    its idle_timeout and park_after make, whose name the simulator takes as its spec and whose
    decisions are then the same, rung for rung and time for time."""
    from zerostart.policy import ModelView, Rung, make
    from zerostart.serve.gateway._model import Model, policy_for

    cfg = ModelConfig(path="/x", idle_timeout=60, park_after=5)
    server = policy_for(cfg)
    simulated = make(server.name)
    assert server.name == "ttl:60,park=5" and policy_for(ModelConfig(path="/x", idle_timeout=60)).name == "ttl:60"
    for rung in (Rung.HOT, Rung.PARKED):
        for busy in (False, True):
            for now in range(0, 100, 3):
                view = ModelView("m", rung, busy, last_active=10.0)
                assert server.decide(view, float(now)) == simulated.decide(view, float(now))
    assert Model(cfg, 100, server).status(0.0)["keep_alive_policy"] == "ttl:60,park=5"


def test_an_idle_replica_goes_on_its_own_while_another_serves() -> None:
    """The policy is asked about each idle replica: a second replica idle past idle_timeout stops
    though the first still serves (the model as a whole is busy)."""
    from zerostart.serve.gateway._model import Model, policy_for

    cfg = ModelConfig(path="/x", idle_timeout=60, max_replicas=2)
    m = Model(cfg, 100, policy_for(cfg))
    serving, idle = _replica(cfg, State.HOT, 100.0), _replica(cfg, State.HOT, 0.0)
    serving.begin(100.0)
    m.replicas += [serving, idle]
    m.last_active = 100.0
    assert m.view().busy and not m.view(idle).busy
    assert m.next_move(idle, 30.0) == (60.0, "stay") and m.next_move(idle, 61.0) == (61.0, "stop")


def test_the_longest_keep_alive_wins_until_it_expires() -> None:
    """One client's keep_alive does not shorten another's: each request holds its replica for
    its own keep_alive (or idle_timeout) from its end, and the replica stays until the last of
    these runs out (issue 15, item 9)."""
    from zerostart.serve.gateway._model import Model, policy_for

    cfg = ModelConfig(path="/x", idle_timeout=60)
    m = Model(cfg, 100, policy_for(cfg))
    r = _replica(m.cfg, State.HOT, 10.0, keep_alive=3600.0)  # a client asked for an hour
    r.hold(20.0, 0.0)  # another then asked for 0 ("unload when done")
    r.hold(30.0, None)  # and a third for nothing (idle_timeout)
    assert m.next_move(r, 31.0) == (3610.0, "stay")  # the hour wins until it expires
    assert m.next_move(r, 3610.0) == (3610.0, "stop")
    alone = _replica(m.cfg, State.HOT, 10.0, keep_alive=0.0)  # keep_alive 0 alone unloads at once
    assert m.next_move(alone, 10.0) == (10.0, "stop")
    forever = _replica(m.cfg, State.HOT, 10.0, keep_alive=float("inf"))  # negative keep_alive: forever
    forever.hold(11.0, 0.0)
    assert m.next_move(forever, 12.0)[0] == float("inf")


def test_a_policy_that_says_parked_parks() -> None:
    from zerostart.policy import LADDER, Decision, Rung
    from zerostart.serve.gateway._model import Model

    parked = _FixedPolicy(Decision(Rung.PARKED, recheck_at=500.0), LADDER)
    m = Model(ModelConfig(path="/x"), 100, parked)
    assert m.parkable  # the policy may rest it on the parked rung
    assert m.next_move(_replica(m.cfg, State.HOT, 0.0), 100.0) == (100.0, "park")
    assert m.next_move(_replica(m.cfg, State.PARKED, 0.0), 100.0) == (500.0, "stay")
    # not parkable: parked is as far as it would go, so it stops
    m = Model(ModelConfig(path="/x", parkable=False), 100, parked)
    assert m.next_move(_replica(m.cfg, State.HOT, 0.0), 100.0) == (100.0, "stop")
    for rung in (Rung.IMAGE, Rung.ZERO):
        m = Model(ModelConfig(path="/x"), 100, _FixedPolicy(Decision(rung), LADDER))
        assert m.next_move(_replica(m.cfg, State.PARKED, 0.0), 100.0) == (100.0, "stop")
    hot = Model(ModelConfig(path="/x"), 100, _FixedPolicy(Decision(Rung.HOT), (Rung.HOT, Rung.ZERO)))
    assert not hot.parkable and hot.next_move(_replica(hot.cfg, State.HOT, 0.0), 100.0)[1] == "stay"


def test_a_policy_s_pre_warm_climbs_once_per_predicted_arrival() -> None:
    """The floor is asked several times a tick (the ticker, the climb, memory admission). It once
    used a pre-warm up the first time it was asked, so the climb, asking next, found nothing to
    do: a policy answering a ``prewarm_at`` already past with a lower rung (as the Decision
    contract allows; the built-in policies answer HOT by then) never climbed. Only the climb
    that begins uses it up."""
    from zerostart.policy import LADDER, Decision, Rung
    from zerostart.serve.gateway._model import Model

    policy = _FixedPolicy(Decision(Rung.PARKED, prewarm_at=50.0), LADDER)
    m = Model(ModelConfig(path="/x"), 100, policy)
    m.replicas.append(_replica(m.cfg, State.PARKED, 0.0))
    m.last_active = 0.0
    assert m.floor(40.0) == 0  # not yet due
    assert m.floor(60.0) == 1 and m.floor(60.0) == 1  # due, however often asked
    assert m.next_climb(60.0) == "wake"
    m.climb_began("wake", 60.0)
    assert m.climb_ahead and m.floor(61.0) == 0  # that arrival's pre-warm is used up
    policy.decision = Decision(Rung.PARKED, prewarm_at=80.0)  # the next predicted arrival
    assert m.floor(79.0) == 0 and m.floor(80.0) == 1


def test_model_sources_in_the_config() -> None:
    from zerostart.serve._config import default_name, load_config

    cfg = load_config(data={"models": [{"path": "hf://meta-llama/Llama-3.2-1B@main"}, {"path": "s3://bucket/models/qwen/"},
                                       {"path": "https://host/m/phi.safetensors"}]})
    assert [m.path for m in cfg.models] == ["hf://meta-llama/Llama-3.2-1B@main", "s3://bucket/models/qwen/",
                                            "https://host/m/phi.safetensors"]
    assert [m.served_name for m in cfg.models] == ["Llama-3.2-1B", "qwen", "phi"]
    assert default_name("/a/b/model.safetensors") == "model"
    assert default_name("/a/b/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    with pytest.raises(ValueError, match="unknown source scheme"):
        load_config(data={"models": [{"path": "ftp://x/y"}]})


def test_worker_threads_share_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU worker's threads: the model's own setting, else the CPUs available less one shared by
    the CPU workers that may run at once; workers on accelerators are left alone."""
    from zerostart.serve._config import ConfigError, load_config
    from zerostart.serve.gateway import _lifecycle

    monkeypatch.setattr(_lifecycle, "available_cpus", lambda: 9)
    cfg = load_config(data={"models": [
        {"path": "/x/a", "max_replicas": 2, "memory_estimate": 1}, {"path": "/x/b", "memory_estimate": 1},
        {"path": "/x/c", "threads": 3, "memory_estimate": 1}, {"path": "/x/g", "device": "cuda:0", "memory_estimate": 1}]})
    assert _lifecycle.cpu_threads(cfg) == {"a": 2, "b": 2, "c": 3, "g": None}  # (9 - 1) CPUs / (2 + 1 + 1) workers
    monkeypatch.setattr(_lifecycle, "available_cpus", lambda: 2)
    assert _lifecycle.cpu_threads(cfg)["a"] == 1  # never below one
    fleet = zerostart.serve.Fleet(cfg)
    assert fleet.lifecycle._threads == {"a": 1, "b": 1, "c": 3, "g": None}
    with pytest.raises(ConfigError, match=r"models\[0\].threads"):
        load_config(data={"models": [{"path": "/x/a", "threads": 0}]})


def test_eviction_parks_on_accelerators_and_stops_parked_cpu_replicas() -> None:
    """Who makes room: an idle parkable replica on a GPU is parked (its device memory freed, the
    worker kept); on CPU, where parked weights still take host RAM, a parked replica is stopped."""
    from zerostart.serve._config import load_config
    from zerostart.serve.gateway import Fleet

    fleet = Fleet(load_config(data={"models": [
        {"path": "/x/a", "device": "cuda:0", "park_after": 30, "memory_estimate": 100},
        {"path": "/x/b", "device": "cuda:0", "memory_estimate": 100},
        {"path": "/x/c", "memory_estimate": 100},
        {"path": "/x/d", "memory_estimate": 100},
    ]}))
    models = fleet.models
    a, b, c, d = (models[n] for n in "abcd")
    a.replicas = [_replica(a.cfg, State.HOT, 5.0)]
    b.replicas = [_replica(b.cfg, State.HOT, 1.0)]  # idle longer, but not parkable: stopping it costs a full start
    a.last_ready_s = b.last_ready_s = 3.0
    a.last_wake_s = 0.1
    victim = fleet.memory.victim("cuda:0", exclude=c)
    assert victim is not None and victim[0] is a and victim[2] == "park"

    parked = _replica(c.cfg, State.PARKED, 2.0)
    parked.reserved_bytes = 100
    c.replicas = [parked]
    victim = fleet.memory.victim("cpu", exclude=d)
    assert victim is not None and victim[1] is parked and victim[2] == "stop"
    # a stand-in waiter (only its presence counts): requests wait for it: it is about to wake, not to be evicted
    c.waiters.append(object())  # type: ignore[arg-type]
    assert fleet.memory.victim("cpu", exclude=d) is None


@pytest.mark.parametrize("server, device, estimates, reserve", [
    ({"standby_workers": 1, "standby_reserve": "8GiB"}, "cpu", [], 8 << 30),
    ({"standby_workers": 1, "standby_reserve": "auto"}, "cpu", [3 << 30, 5 << 30], 5 << 30),
    ({"standby_workers": 1, "standby_reserve": "auto"}, "cpu", [], 0),  # nothing known: logged, none made
    ({"standby_workers": 1, "standby_reserve": "8GiB"}, "cuda:0", [1 << 30], 0),  # CPU arenas only: logged
    ({"standby_workers": 0, "standby_reserve": "8GiB"}, "cpu", [], 0),  # no spare, no reserve
])
def test_standby_reserve_resolves(server: dict, device: str, estimates: list[int], reserve: int) -> None:
    from zerostart.serve._config import ServerConfig
    from zerostart.serve.gateway._standby import Standby

    s = Standby(ServerConfig(**server), device=device, timeout=1.0, estimates=estimates)
    assert s.reserve == reserve
    if server["standby_workers"]:
        status = s.status()
        assert status is not None and status["reserve_bytes"] == reserve
    else:
        assert s.status() is None


def test_the_config_names_every_registered_backend() -> None:
    """A model's ``backend:`` accepts exactly the backends that are registered, by their name."""
    from typing import get_args

    from zerostart.serve._config import Backend
    from zerostart.serve.backends import BACKENDS, backend_class

    assert sorted(get_args(Backend)) == sorted(BACKENDS) == ["command", "llamacpp", "sglang", "vllm", "zerostart"]
    for name, cls in BACKENDS.items():
        assert cls.name == name and backend_class(name) is cls
    with pytest.raises(KeyError, match="unknown backend 'tgi'"):
        backend_class("tgi")
    with pytest.raises(ValueError, match="models\\[0\\].backend"):
        from zerostart.serve._config import load_config

        load_config(data={"models": [{"path": "/x", "backend": "tgi"}]})
