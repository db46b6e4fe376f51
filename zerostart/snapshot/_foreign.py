"""Suspend and resume any GPU process (a foreign engine such as vLLM or llama.cpp) with the
CUDA driver's checkpoint API: lock the process's CUDA work, checkpoint its device memory into
host memory (the GPU memory is freed), and later restore and unlock it.

    suspend(pid)   # cuCheckpointProcessLock + cuCheckpointProcessCheckpoint
    resume(pid)    # cuCheckpointProcessRestore + cuCheckpointProcessUnlock
    state(pid)     # "running" | "locked" | "checkpointed" | "failed"

Needs an NVIDIA driver with the checkpoint API (R550+; checked at call time) and permission to
act on the process (the same user, or root). Errors say what is missing.
"""

from __future__ import annotations

from zerostart.snapshot._vmm import VmmUnavailable, _driver


class CheckpointUnavailable(RuntimeError):
    """The driver, bindings or permissions do not allow checkpointing this process."""


def _api(name: str):
    try:
        d = _driver()
    except VmmUnavailable as e:
        raise CheckpointUnavailable(str(e)) from None
    fn = getattr(d, name, None)
    if fn is None:
        raise CheckpointUnavailable(f"this cuda-bindings/driver has no {name}: the CUDA checkpoint API needs driver R550+ "
                                    "and cuda-bindings 12.8+")
    return d, fn


def _call(name: str, pid: int, *args) -> object:
    d, fn = _api(name)
    _ensure_init(d)
    result = fn(pid, *args)
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != d.CUresult.CUDA_SUCCESS:
        ename = d.cuGetErrorName(err)[1]
        ename = ename.decode() if isinstance(ename, bytes) else str(ename)
        hint = ""
        if "NOT_SUPPORTED" in ename or "NOT_FOUND" in ename:
            hint = " (the driver does not support checkpointing here)"
        elif "INVALID_VALUE" in ename or "PERMISSION" in ename:
            hint = f" (is {pid} a running CUDA process you may act on?)"
        raise CheckpointUnavailable(f"{name}({pid}) failed: {ename}{hint}")
    return rest[0] if rest else None


def _ensure_init(d) -> None:
    r = d.cuInit(0)
    err = r[0] if isinstance(r, tuple) else r
    if err != d.CUresult.CUDA_SUCCESS:
        raise CheckpointUnavailable(f"cuInit failed: {err}")


def state(pid: int) -> str:
    d, _ = _api("cuCheckpointProcessGetState")
    s = _call("cuCheckpointProcessGetState", pid)
    names = {
        "CU_PROCESS_STATE_RUNNING": "running",
        "CU_PROCESS_STATE_LOCKED": "locked",
        "CU_PROCESS_STATE_CHECKPOINTED": "checkpointed",
        "CU_PROCESS_STATE_FAILED": "failed",
    }
    return names.get(getattr(s, "name", str(s)), str(s))


def suspend(pid: int, lock_timeout_ms: int = 10_000) -> None:
    """Stop ``pid``'s CUDA work and move its device memory to host memory."""
    d, _ = _api("cuCheckpointProcessLock")
    args = d.CUcheckpointLockArgs()
    args.timeoutMs = lock_timeout_ms
    _call("cuCheckpointProcessLock", pid, args)
    try:
        _call("cuCheckpointProcessCheckpoint", pid, d.CUcheckpointCheckpointArgs())
    except BaseException:
        _call("cuCheckpointProcessUnlock", pid, d.CUcheckpointUnlockArgs())
        raise


def resume(pid: int) -> None:
    """Bring ``pid``'s device memory back and let its CUDA work continue."""
    d, _ = _api("cuCheckpointProcessRestore")
    if state(pid) == "checkpointed":
        _call("cuCheckpointProcessRestore", pid, d.CUcheckpointRestoreArgs())
    if state(pid) == "locked":
        _call("cuCheckpointProcessUnlock", pid, d.CUcheckpointUnlockArgs())
