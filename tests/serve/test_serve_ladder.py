"""The cold ladder in the server, end to end with real workers and the real openai client:
parking and waking, ready images (written, restored, rejected when corrupt or truncated), and
the standby worker (a worker on its own: test_serve_worker_alone.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from zerostart import weights

from tests.serve._helpers import GREEDY, LONG_STREAM, Gateway, pid_alive, rss, weights_bytes
from tests.weights._servers import RangeServer


@pytest.fixture(scope="module")
def copies(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Private copies of the tiny checkpoint: each source has its own ready image."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name in ("imagey", "standby", "stale"):
        out[name] = str(root / name)
        shutil.copytree(tiny_model, out[name])
    out["staleg"] = _write_gguf(tiny_model, str(root / "staleg.gguf"))
    return out


def _perturbed(tensors: dict) -> dict:
    """Other weights of the same shapes: the matrices with noise of their own size added."""
    import torch

    g = torch.Generator().manual_seed(7)
    return {n: t + torch.randn(t.shape, generator=g).to(t.dtype) * t.float().std().to(t.dtype) if t.dim() == 2 else t
            for n, t in tensors.items()}


def _write_gguf(model_dir: str, path: str, perturb: bool = False) -> str:
    """The tiny checkpoint as an F32 GGUF file (its weights perturbed, if asked)."""
    import json

    from tests.weights._gguf_files import write_gguf

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    tensors = {n: t.float() for n, t in weights.load(model_dir).items()}
    return write_gguf(path, cfg, _perturbed(tensors) if perturb else tensors, model_dir)


def _rewrite_in_place(path: str, new: str) -> None:
    """``new``'s bytes written over ``path`` (same size, same inode), its old mtime put back."""
    st = os.stat(path)
    with open(new, "rb") as f:
        data = f.read()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def http_source(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    """The tiny checkpoint served over HTTP (with ranges and ETags) as ``<url>/remote``."""
    root = tmp_path_factory.mktemp("http")
    shutil.copytree(tiny_model, root / "remote")
    srv = RangeServer(str(root))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def gw(tiny_model: str, copies: dict[str, str], http_source: RangeServer, tmp_path_factory: pytest.TempPathFactory):
    config = {"models": [
        # float32: parking must free at least the default (bfloat16) weights' bytes, and RSS moves
        # by more than that tiny model's 279 KB on its own
        {"path": tiny_model, "name": "parky", "park_after": 0.5, "idle_timeout": 3, "images": "off",
         "dtype": "float32"},
        {"path": copies["imagey"], "name": "imagey", "idle_timeout": 0.5},  # images: write (the default)
        {"path": f"{http_source.url}/remote", "idle_timeout": 0.5},
        {"path": tiny_model, "name": "wakefail", "park_after": 0.3, "idle_timeout": 60, "images": "off",
         "stop_timeout": 2},
        {"path": copies["stale"], "name": "stale", "idle_timeout": 0.5},
        {"path": copies["staleg"], "name": "staleg", "idle_timeout": 0.5},
    ]}
    g = Gateway(config, str(tmp_path_factory.mktemp("ladder")))
    yield g
    g.stop()


def test_hot_parked_woken_parked_zero(gw: Gateway, tiny_model: str) -> None:
    client = gw.openai()
    first = client.completions.with_raw_response.create(model="parky", **GREEDY)
    assert int(first.headers["x-zerostart-cold-start-ms"]) > 0
    text = first.parse().choices[0].text
    assert gw.cold_starts("parky", "source") == 1
    pid = gw.model("parky")["workers"][0]["pid"]

    # a request in flight keeps it hot well past park_after (0.5 s)
    stream = client.completions.create(model="parky", **LONG_STREAM)
    next(iter(stream))
    time.sleep(1.2)
    m = gw.model("parky")
    assert m["state"] == "hot" and m["in_flight"] == 1, m
    assert gw.metric("zerostart_parks_total", model="parky", reason="idle") == 0
    hot_rss = rss(pid)  # weights and the KV cache those sequences touched
    stream.close()

    gw.wait_for("parky to park", lambda: gw.model("parky")["state"] == "parked", timeout=10)
    m = gw.model("parky")
    assert m["workers"][0]["pid"] == pid and m["workers"][0]["state"] == "parked" and pid_alive(pid)
    assert gw.metric("zerostart_parks_total", model="parky", reason="idle") == 1
    assert gw.metric("zerostart_model_state", model="parky", state="parked") == 1
    assert rss(pid) < hot_rss - weights_bytes(tiny_model)  # weights out of the process, KV cache dropped

    # requests wake it, with one wake however many arrive: the same worker, the same greedy
    # output, one cold start of rung parked
    burst = asyncio.run(gw.burst(20, clients=4, model="parky", **GREEDY))
    assert all(not isinstance(r, Exception) for r in burst), burst
    assert {r.parse().choices[0].text for r in burst} == {text}
    assert max(int(r.headers["x-zerostart-cold-start-ms"]) for r in burst) > 0
    m = gw.model("parky")
    assert m["state"] == "hot" and m["workers"][0]["pid"] == pid and m["workers"][0]["rung"] == "parked"
    assert gw.cold_starts("parky", "parked") == 1 and gw.cold_starts("parky") == 2
    cold = m["last_cold_start"]
    assert cold["rung"] == "parked", cold
    names = [p["name"] for p in cold["phases"]]
    assert names == ["wake", "first_token"], names  # no spawn, import or load: the worker was kept
    wake = cold["phases"][0]
    assert wake["bytes"] >= weights_bytes(tiny_model) and wake["gbps"] > 0  # the arena: weights (+ alignment)
    assert gw.phase_count("parky", "wake") == 1
    # serving again from the worker's own memory, not from the parked file's shared pages
    gw.wait_for("the weights off the parked file", lambda: gw.model("parky")["state"] == "hot"
                and "zerostart-parked" not in Path(f"/proc/{pid}/maps").read_text(), timeout=5)

    # idle again: parked after park_after, then zero once idle_timeout (3 s) has passed since the request
    t0 = time.monotonic()
    gw.wait_for("parky to park again", lambda: gw.model("parky")["state"] == "parked", timeout=10)
    gw.wait_for("parky to reach zero", lambda: gw.model("parky")["state"] == "zero", timeout=15)
    assert time.monotonic() - t0 >= 2.0
    gw.wait_for("the parked worker to exit", lambda: not pid_alive(pid), timeout=10)
    assert gw.metric("zerostart_replica_stops_total", model="parky", reason="idle") == 1
    assert gw.metric("zerostart_parks_total", model="parky", reason="idle") == 2


def test_a_wake_that_fails_gives_a_fresh_start(gw: Gateway) -> None:
    client = gw.openai()
    text = client.completions.create(model="wakefail", **GREEDY).choices[0].text
    gw.wait_for("wakefail to park", lambda: gw.model("wakefail")["state"] == "parked", timeout=10)
    pid = gw.model("wakefail")["workers"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # the wake will hang ...
    out: dict = {}

    def ask() -> None:
        out["raw"] = client.completions.with_raw_response.create(model="wakefail", **GREEDY)

    t = threading.Thread(target=ask)
    t.start()
    try:
        gw.wait_for("the wake to begin", lambda: gw.model("wakefail")["state"] == "waking", timeout=10)
    finally:
        os.kill(pid, signal.SIGKILL)  # ... and fail: the worker is gone mid-wake
    t.join(30)
    raw = out["raw"]  # the request got a fresh worker, not an error
    assert raw.status_code == 200 and raw.parse().choices[0].text == text
    m = gw.model("wakefail")
    assert m["state"] == "hot" and m["workers"][0]["pid"] != pid and m["last_cold_start"]["rung"] == "source"
    assert gw.metric("zerostart_start_failures_total", model="wakefail", cause="wake") == 1
    assert gw.cold_starts("wakefail", "source") == 2 and gw.cold_starts("wakefail", "parked") == 0
    assert "waking worker pid" in gw.tail(100) and "the next start is fresh" in gw.tail(100)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1000, os.SEEK_END)
        b = f.read(1)
        f.seek(-1000, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x5A]))


def test_ready_images_written_restored_and_rejected(gw: Gateway, copies: dict[str, str]) -> None:
    client = gw.openai()

    def cold_start(rung: str) -> tuple[str, dict]:
        gw.wait_for("imagey at zero", lambda: gw.model("imagey")["state"] == "zero", timeout=15)
        out = client.completions.with_raw_response.create(model="imagey", **GREEDY)
        assert out.status_code == 200 and int(out.headers["x-zerostart-cold-start-ms"]) > 0
        cold = gw.model("imagey")["last_cold_start"]
        assert cold["rung"] == rung, cold
        return out.parse().choices[0].text, cold

    # 1. from the source; the image is written in the background once the worker is idle
    text, cold = cold_start("source")
    image = cold["image"]
    assert image["mode"] == "write" and image["status"] in ("queued", "writing", "written"), image
    manifest = os.path.join(image["path"], "zerostart-image.json")
    gw.wait_for("the ready image to be written", lambda: os.path.isfile(manifest), timeout=10)

    # 2. the next cold start restores it (checksums verified while it loads); same output
    again, cold = cold_start("image")
    assert again == text
    assert cold["image"]["status"] == "used" and cold["image"]["path"] == image["path"]
    read = next(p for p in cold["phases"] if p["name"] == "read")
    assert read["detail"]["verified_bytes"] > 0
    # mapped from the image as it loads; once serving, from the worker's own memory
    assert read["detail"]["strategy"] == {"mmap": 1}
    pid = gw.model("imagey")["workers"][0]["pid"]
    blob = os.path.join(image["path"], "model.safetensors")
    gw.wait_for("the weights off the image's pages", lambda: blob not in Path(f"/proc/{pid}/maps").read_text(), timeout=10)
    assert gw.cold_starts("imagey", "source") == 1 and gw.cold_starts("imagey", "image") == 1

    # 3. a flipped byte: reported, never served from; the source answers and the image is rewritten
    blob = os.path.join(image["path"], "model.safetensors")
    with open(blob, "rb") as f:
        whole = f.read()
    _flip_byte(blob)
    out, cold = cold_start("source")
    assert out == text
    assert "fails its checksum" in cold["image"]["rejected"], cold["image"]
    rejected = next(p for p in cold["phases"] if p["name"] == "rejected_image")
    assert "fails its checksum" in rejected["detail"]["reason"]
    assert "was not used" in gw.tail(200) and "fails its checksum" in gw.tail(200)
    gw.wait_for("the image to be rewritten whole", lambda: os.path.isfile(manifest) and _read(blob) == whole,
                timeout=10)

    # 4. a truncated file: the same
    size = os.path.getsize(blob)
    os.truncate(blob, size - 4096)
    out, cold = cold_start("source")
    assert out == text
    assert "truncated" in cold["image"]["rejected"], cold["image"]
    assert gw.cold_starts("imagey", "source") == 3 and gw.cold_starts("imagey", "image") == 1


@pytest.mark.parametrize("name", ["stale", "staleg"])
def test_weights_replaced_in_place_are_served(gw: Gateway, copies: dict[str, str], tmp_path, name: str) -> None:
    """The source's bytes change under the same path and config (rewritten in place, even with
    the old mtime put back): its ready image is stale, the new weights are served, and the
    image is rewritten from them. For a safetensors directory and for a GGUF file."""
    from zerostart.engine import Engine, SamplingParams

    client = gw.openai()

    def cold_start() -> tuple[str, dict]:
        gw.wait_for(f"{name} at zero", lambda: gw.model(name)["state"] == "zero", timeout=15)
        out = client.completions.create(model=name, **GREEDY)
        return out.choices[0].text, gw.model(name)["last_cold_start"]

    def built_from() -> str | None:
        try:
            return weights.read_manifest(cold["image"]["path"])["source_identity"]
        except weights.ImageError:
            return None

    old, cold = cold_start()
    gw.wait_for("the ready image", lambda: built_from() is not None, timeout=10)
    first = built_from()
    assert first == weights.identity(copies[name])
    assert cold_start()[1]["rung"] == "image"

    source = copies[name]
    if name == "stale":
        new_dir = str(tmp_path / "new")
        shutil.copytree(source, new_dir)
        perturbed = _perturbed(weights.load(source))  # in the file's order
        weights.save_file(perturbed, os.path.join(new_dir, "model.safetensors"), metadata={"format": "pt"}, keep_order=True)
        _rewrite_in_place(os.path.join(source, "model.safetensors"), os.path.join(new_dir, "model.safetensors"))
        expected_from = new_dir
    else:
        expected_from = _write_gguf(copies["stale"], str(tmp_path / "new.gguf"), perturb=True)
        _rewrite_in_place(source, expected_from)
    engine = Engine.from_pretrained(expected_from)
    try:
        params = SamplingParams(max_tokens=GREEDY["max_tokens"], temperature=0, ignore_eos=True)
        expected = "".join(ev.text for ev in engine.generate(GREEDY["prompt"], params))
    finally:
        engine.stop()
    assert expected != old

    new, cold = cold_start()
    assert cold["rung"] == "source" and "the source changed since" in cold["image"]["rejected"], cold["image"]
    assert new == expected
    gw.wait_for("the image rewritten", lambda: built_from() not in (None, first), timeout=10)
    assert built_from() == weights.identity(copies[name])
    again, cold = cold_start()
    assert cold["rung"] == "image" and again == expected


def test_a_remote_source(gw: Gateway, http_source: RangeServer, tiny_model: str) -> None:
    client = gw.openai()
    m = gw.model("remote")  # named after the URL's last component
    assert m["memory_estimate_bytes"] is None  # not in the local cache and no memory_estimate: known after a load
    first = client.completions.with_raw_response.create(model="remote", **GREEDY)
    text = first.parse().choices[0].text
    m = gw.model("remote")
    assert m["last_cold_start"]["rung"] == "source"
    fetched = http_source.bytes_sent
    assert fetched >= weights.resolve(tiny_model).nbytes  # the weights came over HTTP
    assert m["memory_estimate_bytes"] > weights_bytes(tiny_model)  # measured: weights + KV cache

    # its ready image (keyed by the URL) serves the next cold start without fetching the weights again
    manifest = os.path.join(m["last_cold_start"]["image"]["path"], "zerostart-image.json")
    gw.wait_for("the ready image", lambda: os.path.isfile(manifest), timeout=10)
    gw.wait_for("remote at zero", lambda: gw.model("remote")["state"] == "zero", timeout=15)
    again = client.completions.with_raw_response.create(model="remote", **GREEDY)
    assert again.parse().choices[0].text == text
    assert gw.model("remote")["last_cold_start"]["rung"] == "image"
    assert http_source.bytes_sent == fetched


# -- the standby worker -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standby_gw(copies: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    config = {"server": {"standby_workers": 1, "standby_reserve": "auto"},
              "models": [{"path": copies["standby"], "name": "sb", "idle_timeout": 0.5}]}
    g = Gateway(config, str(tmp_path_factory.mktemp("standby")))
    yield g
    g.stop()


def _spare(g: Gateway) -> dict:
    return g.status()["standby"]


def test_standby_worker_takes_cold_starts(standby_gw: Gateway) -> None:
    g = standby_gw
    client = g.openai()
    g.wait_for("a ready standby worker", lambda: _spare(g)["state"] == "ready", timeout=30)
    spare = _spare(g)["pid"]
    assert g.metric("zerostart_standby_workers_ready") == 1
    assert g.model("sb")["state"] == "zero" and g.model("sb")["replicas"] == 0  # the spare holds no model
    # auto: the model's memory estimate (its weights as a CPU worker holds them)
    assert _spare(g)["reserve_bytes"] == g.model("sb")["memory_estimate_bytes"] > 0

    first = client.completions.with_raw_response.create(model="sb", **GREEDY)
    text = first.parse().choices[0].text
    m = g.model("sb")
    assert m["workers"][0]["pid"] == spare  # the spare became the replica
    cold = m["last_cold_start"]
    assert cold["rung"] == "standby+source", cold
    names = {p["name"] for p in cold["phases"]}
    assert not names & {"spawn", "import", "device_init"}, names  # paid before the request, not by it
    assert {"read", "prepare", "warmup", "first_token"} <= names, names
    paid_before = {p["name"]: p["seconds"] for p in cold["standby"]["phases"]}
    assert {"spawn", "import", "device_init", "reserve"} <= set(paid_before), cold["standby"]
    # the weights went into the memory the spare faulted in while it waited
    read = next(p for p in cold["phases"] if p["name"] == "read")
    assert read["detail"]["prefaulted_bytes"] > 0, read
    assert cold["ready_s"] < paid_before["import"]  # the whole cold start took less than the import it skipped
    assert g.cold_starts("sb", "standby+source") == 1

    # a new spare follows, and the image written after that source load serves the next cold start
    g.wait_for("a new standby worker", lambda: _spare(g)["state"] == "ready" and _spare(g)["pid"] != spare, timeout=30)
    spare2 = _spare(g)["pid"]
    manifest = os.path.join(cold["image"]["path"], "zerostart-image.json")
    g.wait_for("the ready image", lambda: os.path.isfile(manifest), timeout=10)
    g.wait_for("sb at zero", lambda: g.model("sb")["state"] == "zero", timeout=15)
    again = client.completions.with_raw_response.create(model="sb", **GREEDY)
    assert again.parse().choices[0].text == text
    m = g.model("sb")
    assert m["workers"][0]["pid"] == spare2 and m["last_cold_start"]["rung"] == "standby+image"
    assert g.cold_starts("sb", "standby+image") == 1 and g.cold_starts("sb") == 2


# -- CUDA: parking through VMM memory, images written through a host copy -------------------------


@pytest.mark.gpu
def test_cuda_park_wake_and_image(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    source = str(tmp_path_factory.mktemp("cuda") / "tiny")
    shutil.copytree(tiny_model, source)
    config = {"models": [{"path": source, "name": "gpu", "device": "cuda", "park_after": 0.5, "idle_timeout": 4}]}
    g = Gateway(config, str(tmp_path_factory.mktemp("cuda-gw")))
    try:
        client = g.openai()
        text = client.completions.create(model="gpu", **GREEDY).choices[0].text
        m = g.model("gpu")
        assert m["last_cold_start"]["rung"] == "source" and m["parkable"], m
        pid = m["workers"][0]["pid"]
        manifest = os.path.join(m["last_cold_start"]["image"]["path"], "zerostart-image.json")
        g.wait_for("the ready image (written from a host copy)", lambda: os.path.isfile(manifest), timeout=60)

        g.wait_for("gpu to park", lambda: g.model("gpu")["state"] == "parked", timeout=30)
        woken = client.completions.create(model="gpu", **GREEDY).choices[0].text
        assert woken == text  # the weights came back at the same addresses: graphs replay the same
        m = g.model("gpu")
        assert m["workers"][0]["pid"] == pid and m["last_cold_start"]["rung"] == "parked"
        wake = m["last_cold_start"]["phases"][0]
        assert wake["name"] == "wake" and wake["bytes"] > 0 and wake["gbps"] > 0

        g.wait_for("gpu at zero", lambda: g.model("gpu")["state"] == "zero", timeout=60)
        restored = client.completions.create(model="gpu", **GREEDY).choices[0].text
        assert restored == text and g.model("gpu")["last_cold_start"]["rung"] == "image"
    finally:
        g.stop()
