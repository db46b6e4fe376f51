"""The demo checkpoint: Hugging Face layout, deterministic bytes, loadable by transformers."""

import hashlib
import json
import os

import pytest

from zerostart.engine import EngineError
from zerostart.engine import demo


def _digest(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_layout(tiny_dir):
    names = set(os.listdir(tiny_dir))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md", demo.MARKER} == names
    with open(os.path.join(tiny_dir, "tokenizer_config.json")) as f:
        tc = json.load(f)
    assert "chat_template" in tc and tc["eos_token"] == demo.EOT
    with open(os.path.join(tiny_dir, "README.md")) as f:
        assert "gibberish" in f.read()
    with open(os.path.join(tiny_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert os.path.getsize(os.path.join(tiny_dir, "model.safetensors")) < 4 * 2**20


def test_same_seed_same_bytes(tmp_path, tiny_dir):
    again = demo.write_demo_model(str(tmp_path / "again"), size="tiny", seed=0)
    assert _digest(again) == _digest(tiny_dir)
    other = demo.write_demo_model(str(tmp_path / "other"), size="tiny", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(tiny_dir)["model.safetensors"]


def test_existing_directory(tmp_path, tiny_dir):
    # the same demo again: nothing to do; something else there: an error unless overwrite
    assert demo.write_demo_model(tiny_dir, size="tiny", seed=0) == tiny_dir
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(EngineError, match="already exists"):
        demo.write_demo_model(str(tmp_path / "busy"), size="tiny")
    demo.write_demo_model(str(tmp_path / "busy"), size="tiny", overwrite=True)
    assert not (tmp_path / "busy" / "notes.txt").exists()
    with pytest.raises(EngineError, match="unknown demo size"):
        demo.write_demo_model(str(tmp_path / "x"), size="huge")


def test_sharded_layout_loads_in_transformers_and_safetensors(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    spec = demo.SIZES["tiny"]
    monkeypatch.setitem(demo.SIZES, "tiny-sharded", demo.DemoSize(**{**spec.__dict__, "max_shard_bytes": 40_000}))
    path = demo.write_demo_model(str(tmp_path / "sharded"), size="tiny-sharded")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.isfile(os.path.join(path, s)) for s in shards)
    total = 0
    for s in shards:
        tensors = load_file(os.path.join(path, s))
        assert all(index["weight_map"][n] == s for n in tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert total == index["metadata"]["total_size"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) * 2 == total


def test_sizes_are_what_they_claim():
    def params(s):
        hd = s.hidden_size // s.num_heads
        layer = (2 * s.hidden_size + s.hidden_size * hd * (2 * s.num_heads + 2 * s.num_kv_heads)
                 + 3 * s.hidden_size * s.intermediate_size)
        embed = s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2)
        return s.num_layers * layer + embed + s.hidden_size

    assert params(demo.SIZES["tiny"]) * 2 < 1 * 2**20
    assert 20e6 < params(demo.SIZES["small"]) < 60e6
    assert 0.9e9 < params(demo.SIZES["1b"]) < 1.2e9


def test_cli(tmp_path, child_env):
    import subprocess
    import sys

    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "zerostart", "demo-model", "--out", str(out), "--size", "tiny"],
                       capture_output=True, text=True, env=child_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and "gibberish" in r.stderr
