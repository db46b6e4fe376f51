"""Measuring what a foreign worker's process tree holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from zerostart.serve.backends._measure import device_bytes, host_bytes, process_tree

# A parent that starts a child; each touches 64 MiB of its own, then both wait.
CHILD = "import os, time; x = bytearray(os.urandom(1)) * (64 << 20); print('ready', flush=True); time.sleep(60)"
PARENT = (f"import os, subprocess, sys, time; x = bytearray(os.urandom(1)) * (64 << 20); "
          f"c = subprocess.Popen([sys.executable, '-c', {CHILD!r}], stdout=subprocess.PIPE); c.stdout.readline(); "
          f"print(c.pid, flush=True); time.sleep(60)")


def test_process_tree_and_its_memory():
    p = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    try:
        child = int(p.stdout.readline())
        tree = process_tree(p.pid)
        assert tree[0] == p.pid and child in tree
        held = host_bytes(tree)
        assert held >= 2 * (64 << 20), held  # both touched buffers, plus two interpreters
        assert host_bytes([p.pid]) < held
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    os.kill(child, signal.SIGKILL)  # orphaned by its parent's death: ours to end
    deadline = time.time() + 10
    while process_tree(child) and time.time() < deadline:
        time.sleep(0.05)
    assert process_tree(p.pid) == [] and process_tree(child) == []
    assert host_bytes([p.pid]) == 0


def test_device_bytes_without_a_gpu_is_unknown_not_zero():
    assert device_bytes([1], "cpu") is None
