"""Environment for benchmark child processes (the same zerostart as the parent), and the
benchmarks' progress lines (stderr, so that the tables on stdout stay clean)."""

from __future__ import annotations

import os
import subprocess
import sys

import zerostart


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a benchmark's helper process; SIGKILL it if it is still there after ``grace`` s."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
