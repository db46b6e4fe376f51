"""What a worker process tree holds, measured (never estimated): a foreign engine (vLLM,
SGLang, any OpenAI server) is several processes whose sizes nobody told us.

- :func:`process_tree`: a process and all its descendants (vLLM: API server, engine core,
  worker, resource tracker), from ``/proc``.
- :func:`host_bytes`: their proportional set size summed (``/proc/PID/smaps_rollup``: pages
  shared between them, such as forked libraries, are counted once across the tree);
  :func:`host_bytes_of_tree` for a process and its descendants.
- :func:`device_bytes`, :func:`device_total_bytes`, :func:`cuda_pids`: CUDA memory of those
  processes on one GPU, the GPU's size, which of them hold a context, from ``nvidia-smi`` (the
  gateway imports no CUDA library); None where there is no ``nvidia-smi``.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants that are alive now (``pid`` first); [] if it is gone."""
    if not os.path.exists(f"/proc/{pid}"):
        return []
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # exited meanwhile
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return kids


def host_bytes(pids: list[int]) -> int:
    """Summed proportional set size of ``pids`` in bytes (processes that exited count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def host_bytes_of_tree(pid: int) -> int:
    """What ``pid`` and its descendants hold in host memory: :func:`host_bytes` of :func:`process_tree`."""
    return host_bytes(process_tree(pid))


def device_bytes(pids: list[int], device: str) -> int | None:
    """CUDA memory ``pids`` hold on ``device`` (``cuda:N``), per ``nvidia-smi``; None when it
    cannot be asked (no ``nvidia-smi``, or it failed)."""
    exe = shutil.which("nvidia-smi")
    if exe is None or not device.startswith("cuda"):
        return None
    index = device.partition(":")[2] or "0"
    try:
        r = subprocess.run([exe, "--id=" + index, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    wanted, total = set(pids), 0
    for line in r.stdout.splitlines():
        try:
            pid, mib = (int(x.strip()) for x in line.split(","))
        except ValueError:
            continue
        if pid in wanted:
            total += mib << 20
    return total


def device_total_bytes(device: str) -> int | None:
    """The memory of GPU ``device`` (``cuda:N``) per ``nvidia-smi``; None where it cannot tell."""
    exe = shutil.which("nvidia-smi")
    if exe is None or not device.startswith("cuda"):
        return None
    index = device.partition(":")[2] or "0"
    try:
        r = subprocess.run([exe, "--id=" + index, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return int(r.stdout.strip().splitlines()[0]) << 20 if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def cuda_pids(pids: list[int], device: str) -> list[int]:
    """Those of ``pids`` holding a CUDA context on ``device`` (the ones a checkpoint must lock)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    index = device.partition(":")[2] or "0"
    try:
        r = subprocess.run([exe, "--id=" + index, "--query-compute-apps=pid", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    on_gpu = {int(x) for x in r.stdout.split() if x.strip().isdigit()} if r.returncode == 0 else set()
    return [p for p in pids if p in on_gpu]
