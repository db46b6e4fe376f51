"""Fixtures for the cluster tests: tiny demo checkpoints, and (for `ray` tests) one local
multi-node Ray cluster per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

# Ray's switch for binding and dialing loopback only (it otherwise picks this machine's outward
# address); read when ray is imported, so it is set before any test module imports it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _demo(out: str) -> str:
    subprocess.run([sys.executable, "-m", "zerostart", "demo-model", "--out", out, "--size", "tiny"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two tiny demo checkpoints (random weights) in their own directories."""
    root = tmp_path_factory.mktemp("models")
    first = _demo(str(root / "tiny-a"))
    second = str(root / "tiny-b")
    shutil.copytree(first, second)
    return first, second


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, tiny_models):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEROSTART_CACHE_DIR", str(cache))  # every node's replicas inherit it (one machine here)
        from tests.cluster._ray import LocalCluster

        c = LocalCluster(str(tmp_path_factory.mktemp("ray")))
        try:
            yield c
        finally:
            c.close()
