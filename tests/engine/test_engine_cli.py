"""`zerostart generate` prints exactly the completion transformers' greedy generate produces."""

import subprocess
import sys

import pytest
import torch



def _cli(child_env, *args):
    return subprocess.run([sys.executable, "-m", "zerostart", "generate", *args], capture_output=True, text=True,
                          env=child_env, timeout=120)


def test_generate_equals_transformers_greedy(tiny_dir, hf_tiny, child_env):
    model, tok = hf_tiny
    prompt = "Hello world, the model is fast"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    r = _cli(child_env, "--model", tiny_dir, "--prompt", prompt, "--max-tokens", "40", "--timings")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    assert "gibberish" in r.stderr and "tokens/s" in r.stderr and "warmup" in r.stderr


def test_generate_errors_go_to_stderr(tmp_path, child_env):
    r = _cli(child_env, "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 1 and r.stdout == ""
    assert "zerostart: error:" in r.stderr and "config.json" in r.stderr
