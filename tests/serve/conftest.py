"""Fixtures for the gateway tests: a real tiny checkpoint, written once per session."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.serve._helpers import child_env


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The engine's tiny demo checkpoint (random weights), written once per session."""
    out = str(tmp_path_factory.mktemp("models") / "tiny")
    subprocess.run([sys.executable, "-m", "zerostart", "demo-model", "--out", out, "--size", "tiny"],
                   check=True, env=child_env(), capture_output=True)
    return out


@pytest.fixture(scope="session")
def ref(tiny_model: str):
    """The tiny model in an engine of this process, loaded as a worker loads it: what the
    gateway's answers are checked against (used without ``start()``: generate drives its steps)."""
    from zerostart.engine import Engine

    e = Engine.from_pretrained(tiny_model)
    yield e
    e.stop()


@pytest.fixture(scope="session")
def ladder_fleet(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    """A gateway with a model on each rung of the cold ladder (``tests/serve/_ladder.py``), once
    per session, for tests that only read it: a test that sends it requests starts its own."""
    from tests.serve import _ladder

    gw = _ladder.start(tiny_model, str(tmp_path_factory.mktemp("ladder")))
    yield gw
    gw.stop()
