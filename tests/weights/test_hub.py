"""``hf://org/name[@rev]`` against a Hub on loopback (HF_ENDPOINT): downloads through
huggingface_hub into the standard hub cache, only the model's files, with HF_TOKEN for gated
repositories, HF_HUB_OFFLINE, missing revisions and connections dropped mid-file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.weights._hub import Hub, Repo
from tests.weights.test_remote import make_model, same
from zerostart import weights
from zerostart.weights import SourceError, WeightsError

pytest.importorskip("huggingface_hub")

MODEL_FILES = {"config.json", "tokenizer_config.json", "model.safetensors.index.json",
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    h = Hub()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("ZEROSTART_CACHE_DIR", str(tmp_path / "zs-cache"))
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    yield h
    h.close()


@pytest.fixture
def repo(tmp_path, hub):
    """org/m: a sharded checkpoint and, beside it, files a model does not need."""
    root = tmp_path / "repo"
    ref = make_model(root)
    (root / "README.md").write_text("# m\n")
    (root / "original").mkdir()
    (root / "original" / "consolidated.pth").write_bytes(b"\0" * 4096)
    (root / "m.Q4_0.gguf").write_bytes(b"GGUF" + bytes(4096))
    hub.repos["org/m"] = Repo(str(root))
    return hub.repos["org/m"], ref


def test_downloads_only_the_model_files_into_the_hub_cache(hub, repo, tmp_path):
    r, ref = repo
    same(weights.load("hf://org/m"), ref)
    got = {p.rsplit("/", 1)[-1] for p in hub.requested()}
    assert got == MODEL_FILES, got
    snap = tmp_path / "hub-cache" / "models--org--m" / "snapshots" / r.commit
    assert {p.name for p in snap.iterdir()} == MODEL_FILES
    assert (tmp_path / "hub-cache" / "models--org--m" / "refs" / "main").read_text() == r.commit
    asked = len(hub.log)
    same(weights.load("hf://org/m"), ref)  # whole in the cache: the network is not asked again
    assert weights.localize("hf://org/m") == str(snap)
    assert len(hub.log) == asked


def test_a_revision_by_commit(hub, repo):
    r, ref = repo
    same(weights.load(f"hf://org/m@{r.commit}"), ref)
    assert all(f"/resolve/{r.commit}/" in p for p in hub.requested())


def test_gated_repository_needs_hf_token(hub, repo, monkeypatch):
    r, ref = repo
    r.gated_token = "hf_secret"
    with pytest.raises(SourceError, match=r"hf://org/m: org/m is gated: request access on the Hub, then set HF_TOKEN"):
        weights.load("hf://org/m")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(SourceError, match="is gated"):
        weights.load("hf://org/m")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    same(weights.load("hf://org/m"), ref)
    assert {auth for m, p, auth, _ in hub.log if "/resolve/" in p} == {"Bearer hf_secret"}


def test_missing_revision_and_repository(hub, repo):
    with pytest.raises(SourceError, match=r"hf://org/m@v9: revision 'v9' of org/m does not exist at http://127"):
        weights.load("hf://org/m@v9")
    with pytest.raises(SourceError, match=r"hf://org/nothing: no repository org/nothing at http://127.*HF_TOKEN"):
        weights.load("hf://org/nothing")
    with pytest.raises(WeightsError, match="expected hf://org/name"):
        weights.load("hf://just-a-name")


def test_a_connection_dropped_mid_file_is_asked_again(hub, repo):
    _, ref = repo
    hub.drop_after, hub.drop_times = 10_000, 1
    same(weights.load("hf://org/m"), ref)
    assert hub.drop_times == 0, "the connection was dropped"
    gets = [p for p in hub.requested() if p.endswith(".safetensors")]
    assert len(gets) == 3 and len(set(gets)) == 2, "the interrupted file was asked for again"


def test_a_download_that_keeps_failing_leaves_nothing_that_looks_whole(hub, repo, tmp_path):
    _, ref = repo
    hub.drop_after, hub.drop_times = 10_000, 10_000
    with pytest.raises(SourceError, match=r"hf://org/m: downloading org/m from http://127.* failed .* run it again to resume"):
        weights.load("hf://org/m")
    snaps = tmp_path / "hub-cache" / "models--org--m" / "snapshots"
    for d in snaps.iterdir() if snaps.exists() else []:
        for f in d.iterdir():  # whatever is linked under a final name is whole
            assert f.name not in {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} or \
                os.path.getsize(f) == os.path.getsize(tmp_path / "repo" / f.name)
    hub.drop_times = 0
    same(weights.load("hf://org/m"), ref)


def test_offline_never_asks(hub, repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"org/m is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        weights.load("hf://org/m")
    assert hub.log == []


def test_pull_picks_up_a_new_commit_and_the_identity_follows(hub, repo, tmp_path):
    r, ref = repo
    same(weights.load("hf://org/m"), ref)
    before = weights.identity("hf://org/m")
    new_root = tmp_path / "repo2"
    shutil.copytree(r.root, new_root)
    ref2 = make_model(new_root, seed=1)
    hub.repos["org/m"] = Repo(str(new_root), commit="fedcba9876543210fedcba9876543210fedcba98")
    same(weights.load("hf://org/m"), ref)  # the cached main is used as it is, without asking
    weights.pull("hf://org/m")
    same(weights.load("hf://org/m"), ref2)
    assert weights.identity("hf://org/m") != before


def test_the_engine_loads_from_the_hub(hub, tmp_path):
    from zerostart.engine import Engine, EngineConfig, SamplingParams
    from zerostart.engine.demo import write_demo_model

    hub.repos["org/tiny"] = Repo(write_demo_model(str(tmp_path / "tiny"), size="tiny"))
    engine = Engine.from_pretrained("hf://org/tiny", config=EngineConfig(max_num_seqs=1))
    try:
        assert engine.model_name == "tiny" or engine.source == "hf://org/tiny"
        out = list(engine.generate("Hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
        assert len(out) == 4
        assert torch.get_num_threads() >= 1
    finally:
        engine.stop()


def test_one_gguf_file_of_a_repository(hub, repo, monkeypatch):
    r, _ = repo
    path = weights.hf_gguf("hf://org/m", "m.Q4_0.gguf")
    assert path.endswith("/m.Q4_0.gguf") and Path(path).read_bytes()[:4] == b"GGUF"
    assert [p.rsplit("/", 1)[-1] for p in hub.requested()] == ["m.Q4_0.gguf"]  # that file, no other
    assert weights.hf_gguf("hf://org/m") == path  # the repository's only .gguf file
    (Path(r.root) / "m.Q8_0.gguf").write_bytes(b"GGUF" + bytes(8))
    with pytest.raises(WeightsError, match=r"holds 2 \.gguf files; name the one to serve \(one of: m\.Q4_0\.gguf, "
                                           r"m\.Q8_0\.gguf\)"):
        weights.hf_gguf("hf://org/m")
    with pytest.raises(WeightsError, match="not a .gguf file"):
        weights.hf_gguf("hf://org/m", "config.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(hub.log)
    assert weights.hf_gguf("hf://org/m", "m.Q4_0.gguf") == path  # from the cache, offline
    with pytest.raises(WeightsError, match="no file 'm.Q8_0.gguf'.*HF_HUB_OFFLINE is set"):
        weights.hf_gguf("hf://org/m", "m.Q8_0.gguf")
    with pytest.raises(WeightsError, match="name its .gguf file"):
        weights.hf_gguf("hf://org/m")
    assert len(hub.log) == asked
