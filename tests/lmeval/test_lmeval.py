"""lm-evaluation-harness against zerostart: its ``local-completions`` model (echo + logprobs
requests to /v1/completions) on a multiple-choice task and a perplexity task defined from local
files (tests/lmeval/tasks), and its ``hf`` model (transformers) on the same SmolLM2 checkpoint;
accuracies equal, perplexities within 1e-5 relative. ``make test-lmeval`` (its own environment)."""

from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest

from tests.serve._helpers import Gateway

pytestmark = [pytest.mark.lmeval, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LM_EVAL = os.environ.get("ZEROSTART_LMEVAL")


def _run(model: str, model_args: str, out: str, tmp: str) -> dict:
    assert LM_EVAL is not None  # the tests skip without it
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": os.path.join(tmp, "hf")}
    cmd = [LM_EVAL, "--model", model, "--model_args", model_args, "--tasks", "zs_mc,zs_ppl",
           "--include_path", "tests/lmeval/tasks", "--output_path", out]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    with open(path) as f:
        return json.load(f)["results"]


@pytest.mark.timeout(3600)
def test_local_completions_equal_transformers(smollm2_dir: str, tmp_path) -> None:
    if not LM_EVAL or not os.path.exists(LM_EVAL):
        pytest.skip("lm-eval's environment is missing: make test-lmeval")
    model = {"path": smollm2_dir, "name": "smollm2", "dtype": "float32", "idle_timeout": 3600}  # as the hf side
    g = Gateway({"models": [model]}, str(tmp_path))
    try:
        ours = _run("local-completions", f"model=smollm2,base_url={g.url}/v1/completions,tokenizer_backend=huggingface,"
                    f"tokenizer={smollm2_dir},num_concurrent=1,max_retries=1,tokenized_requests=True,max_length=2048",
                    str(tmp_path / "zs"), str(tmp_path))
    finally:
        g.stop()
    ref = _run("hf", f"pretrained={smollm2_dir},dtype=float32", str(tmp_path / "hf"), str(tmp_path))
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["zs_mc"][metric] == ref["zs_mc"][metric]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["zs_ppl"][metric] == pytest.approx(ref["zs_ppl"][metric], rel=1e-5)
