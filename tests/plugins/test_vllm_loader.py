"""``--load-format zerostart`` inside the real vLLM (CPU build): weights read through
zerostart.weights from a local directory, an S3 server on loopback and zerostart's cache, each
giving greedy outputs identical (token ids and log-probabilities) to vLLM's default loader.

One vLLM engine serves the whole test: vLLM's own in-place reload (``reload_weights`` after
``update_config``) swaps loaders and sources, and a reload of perturbed weights between steps
shows that each step really replaced the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.weights._servers import MotoServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1500)]

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Three primary colors are"]


def perturbed_copy(src: str, dst: str) -> str:
    """The same model with every floating tensor scaled by a random factor near 1: greedy
    outputs change, so a reload that does nothing cannot pass for one that worked."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    out = {k: (v.float() * (1 + 0.2 * torch.randn(v.shape, generator=g))).to(v.dtype) if v.is_floating_point() else v
           for k, v in tensors.items()}
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def with_checksums(src: str, dst: str) -> str:
    """``src`` with ``zerostart-checksums.json``: its data section moved to a 4096-byte boundary
    (the header padded with spaces, as zerostart's own writers do), then every block hashed."""
    import struct

    from zerostart.weights import _checksums, read_header

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    with open(os.path.join(src, "model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
        data = f.read()
    header += b" " * (-(8 + len(header)) % 4096)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    _checksums.write(dst, [_checksums.compute(path, read_header(path).data_start)])
    return dst


def corrupted(src: str, dst: str) -> str:
    """``src`` with checksums, then one byte of the weights flipped."""
    with_checksums(src, dst)
    path = os.path.join(dst, "model.safetensors")
    from zerostart.weights import read_header

    off = read_header(path).data_start + 12345
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    return dst


@pytest.fixture(scope="module")
def s3_model(smollm2, tmp_path_factory):
    import boto3

    srv = MotoServer()
    bucket = "zs-vllm"
    client = boto3.client("s3", endpoint_url=srv.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for f in os.listdir(smollm2):
        client.upload_file(os.path.join(smollm2, f), bucket, f"models/smollm2/{f}")
    yield srv, f"s3://{bucket}/models/smollm2"
    srv.close()


def test_zerostart_loader_matches_vllm_default(vllm_python, smollm2, s3_model, tmp_path):
    srv, url = s3_model
    other = perturbed_copy(smollm2, str(tmp_path / "perturbed"))
    summed = with_checksums(smollm2, str(tmp_path / "summed"))
    broken = corrupted(smollm2, str(tmp_path / "broken"))
    cache = tmp_path / "cache"
    default = {"format": "auto", "path": other}  # between steps: weights that give other outputs
    steps = [
        default,                                                                        # 0
        {"format": "zerostart", "path": smollm2},                                       # 1 local
        default,
        {"format": "zerostart", "path": smollm2, "extra": {"source": url}},            # 3 S3 (into the cache)
        default,
        {"format": "zerostart", "path": smollm2, "extra": {"source": url}},            # 5 from the cache
        {"format": "zerostart", "path": summed},                                        # 6 checksums verified
        {"format": "zerostart", "path": broken},                                        # 7 a flipped byte
        {"format": "zerostart", "path": smollm2, "extra": {"treads": 4}},               # 8 a misspelt option
        {"format": "auto", "path": smollm2},                                            # 9 default, timed
        {"format": "zerostart", "path": smollm2},                                       # 10 zerostart, timed
    ]
    env = dict(os.environ, ZEROSTART_CACHE_DIR=str(cache), AWS_ENDPOINT_URL=srv.url, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    env.pop("AWS_PROFILE", None)
    job = {"model": smollm2, "prompts": PROMPTS, "max_tokens": 16, "steps": steps}
    r = subprocess.run([vllm_python, os.path.join(HERE, "_vllm_reload.py")], input=json.dumps(job),
                       capture_output=True, text=True, env=env, timeout=1400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ref, got = out["reference"], out["steps"]

    assert all(o["token_ids"] for o in ref), ref
    assert got[0]["outputs"] != ref, "perturbed weights should change the greedy outputs"
    for i in (1, 3, 5, 6):
        assert got[i]["error"] is None, got[i]["error"]
        assert got[i]["outputs"] == ref, f"step {i}: zerostart's load differs from vLLM's default loader"
        assert got[i]["stats"]["bytes"] == os.path.getsize(os.path.join(smollm2, "model.safetensors")) - \
            _data_start(smollm2), got[i]["stats"]
    assert set(got[1]["stats"]["strategy"]) <= {"mmap", "direct", "buffered"}, got[1]["stats"]
    assert set(got[3]["stats"]["strategy"]) <= {"remote", "remote-mapped"}, got[3]["stats"]  # streamed from S3
    assert got[5]["stats"]["strategy"] == {"mmap": 1}, got[5]["stats"]  # the cache's copy, mapped
    assert got[5]["stats"]["path"].startswith(str(cache)), got[5]["stats"]
    assert got[6]["stats"]["verified_bytes"] == got[6]["stats"]["bytes"]
    assert "checksum" in got[7]["error"] and "model.safetensors" in got[7]["error"], got[7]["error"]
    assert "treads" in got[8]["error"] and "threads" in got[8]["error"], got[8]["error"]
    assert got[9]["outputs"] == ref and got[10]["outputs"] == ref
    print(f"\nin-place reload of SmolLM2-135M bf16 (page cache warm): vLLM default loader {got[9]['seconds']:.2f} s, "
          f"zerostart {got[10]['seconds']:.2f} s (its read {got[10]['stats']['total_s']:.3f} s)")


def _data_start(model: str) -> int:
    from zerostart.weights import read_header

    return read_header(os.path.join(model, "model.safetensors")).data_start
