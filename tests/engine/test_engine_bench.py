"""The benchmarks end to end: `zerostart bench generate` on the tiny demo model (short runs), `bench quant`'s variants and its zerostart rows."""

import json
import os
import subprocess
import sys

import pytest


def test_bench_generate_writes_json(tiny_dir, tmp_path, child_env):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "zerostart", "bench", "generate", "--model", tiny_dir,
                        "--batch", "1,3", "--repeat", "1", "--cold-repeat", "1", "--max-tokens", "6",
                        "--prompt-tokens", "5", "--prefill-tokens", "16", "--threads", "1", "--dtype", "float32,bf16",
                        "--json", str(out)],
                       capture_output=True, text=True, env=child_env, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [(row["dtype"], row["batch"]) for row in data["throughput"]] == [
        ("float32", 1), ("float32", 3), ("bfloat16", 1), ("bfloat16", 3)]
    for row in data["throughput"]:
        assert row["zerostart"]["tokens_per_s"] > 0 and row["transformers"]["tokens_per_s"] > 0
        assert row["ratio"] > 0
        assert 0 < row["fraction_of_limit"] < 1.5
        if row["dtype"] == "float32":
            assert row["same_tokens"] == f"{row['batch']}/{row['batch']}"  # float32 greedy: same tokens
    assert data["weight_bytes"]["bfloat16"] * 2 == data["weight_bytes"]["float32"]
    assert [p["dtype"] for p in data["prefill"]] == ["float32", "bfloat16"]
    assert all(p["tokens"] == 16 and p["zerostart"]["tokens_per_s"] > 0 for p in data["prefill"])
    assert sorted(data["cold_start"]) == ["bfloat16", "float32"]
    for name, dtype in [(n, d) for n in ("zerostart", "transformers") for d in ("float32", "bfloat16")]:
        med = data["cold_start"][dtype][name]["median"]
        assert med["import"] > 0 and med["load"] > 0 and med["first_token"] > 0
        parts = sum(med[k] for k in ("spawn", "import", "load", "warmup", "first_token"))
        assert parts <= med["total"] + 1e-6
    assert "ratio" in r.stdout and "cold start" in r.stdout and "first_token" in r.stdout and "prefill" in r.stdout


def test_bench_generate_scheduling_and_baseline(tiny_dir, tmp_path, child_env):
    # this checkout as its own baseline: the before/after turns run, the same code on both sides
    import zerostart

    root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "zerostart", "bench", "generate", "--model", tiny_dir, "--no-transformers",
                        "--batch", "1,3", "--repeat", "1", "--cold-repeat", "0", "--max-tokens", "4", "--prompt-tokens", "5",
                        "--prefill-tokens", "16", "--threads", "1", "--dtype", "float32", "--engine-defaults",
                        "--long-tokens", "1000", "--chunks", "32,64", "--chunk-tokens", "128", "--baseline", root,
                        "--json", str(out)],
                       capture_output=True, text=True, env=child_env, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    kv = data["kv"]["float32"]
    assert kv["paged"] and kv["slots"] == 32 and kv["tokens"] == kv["blocks"] * kv["block_tokens"] >= 32 * 1024
    assert data["ops_per_token"]["float32"]["aten_ops"] > data["ops_per_token"]["float32"]["top_level"] > 0
    behind = data["behind_long"]
    assert behind["long_tokens"] == 1000 and behind["first_token_steps"] == [1]  # the step it arrived in
    assert [row["chunk"] for row in data["chunks"]] == [32, 64] and all(row["tokens_per_s"] > 0 for row in data["chunks"])
    base = data["baseline"]["dtypes"]["float32"]
    assert base["before"]["aten_ops"] == base["after"]["aten_ops"] and base["before"]["slots"] == 32
    assert all(base[side][k] > 0 for side in ("before", "after") for k in ("b1_tok_s", "b3_tok_s", "prefill_tok_s"))
    assert "before -> after" in r.stdout and "first token" in r.stdout and "KV cache" in r.stdout


def test_bench_quant_variants_keep_the_file_and_change_the_bits(tiny_dir, tmp_path):
    """`bench quant`'s Q8_0 and F16 variants of a Q4_1 file: the same metadata (file type
    aside) and tensors, each quantized matrix holding the source's values to within the
    target's rounding, the float tensors unchanged; Q4_1 is the file itself."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    from tests.weights._gguf_files import random_llama, write_gguf
    from zerostart.bench.quant import variant

    model, cfg = random_llama(tiny_dir)
    src = write_gguf(str(tmp_path / "q41.gguf"), cfg, model.state_dict(), tiny_dir, qtype="Q4_1")
    before = gguf.GGUFReader(src)
    for qtype, tol in (("Q8_0", 1 / 127), ("F16", 1e-3)):
        path = variant(src, qtype, str(tmp_path))
        assert variant(src, qtype, str(tmp_path)) == path and not os.path.exists(path + ".tmp")  # made once
        after = gguf.GGUFReader(path)
        fields = {f.name: f.contents() for f in after.fields.values() if not f.name.startswith("GGUF.")}
        assert fields.pop("general.file_type") == {"Q8_0": 7, "F16": 1}[qtype]  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
        assert fields == {f.name: f.contents() for f in before.fields.values()
                          if not f.name.startswith("GGUF.") and f.name != "general.file_type"}
        assert [t.name for t in after.tensors] == [t.name for t in before.tensors]
        for a, b in zip(after.tensors, before.tensors):
            x, y = dequantize(a.data, a.tensor_type), dequantize(b.data, b.tensor_type)
            if b.tensor_type.name == "Q4_1":
                assert a.tensor_type.name == qtype
                assert np.abs(x - y).max() <= tol * np.abs(y).max() + 1e-6, a.name
            else:
                assert a.tensor_type == b.tensor_type and np.array_equal(x, y), a.name
    assert variant(src, "Q4_1", str(tmp_path)) == src


@pytest.mark.slow  # SmolLM2 (the bench's prompts are token ids of a real vocabulary): about a minute
def test_bench_quant_runs_zerostart_cold_and_from_standby(smollm2_gguf):
    """`bench quant`'s zerostart rows drive a real worker as the gateway does: spawned with the
    model, or a standby worker told what to load (its threads included)."""
    from zerostart.bench.quant import one_run

    for kind in ("image", "standby"):
        run = one_run(kind, smollm2_gguf, 1, "")
        assert run["first_token_s"] > 0 and run["rss"] > run["rss_anon"] > 0, (kind, run)
        assert min(run["decode_b1"], run["decode_b16"], run["prefill"]) > 0, (kind, run)
