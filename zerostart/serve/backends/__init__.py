"""How a replica of each engine is started, probed, parked, woken and stopped: one interface
(:class:`WorkerBackend`, in ``_base.py``), one module per backend, one entry per backend in
:data:`BACKENDS`. A model picks its backend in the config (``backend:``, default ``zerostart``).

    from zerostart.serve.backends import backend_class
    worker = backend_class(model.backend)(model, server, socket_dir)
    cold = await worker.start(parkable=False)       # ColdStart: timeline, climb, image
    upstream = worker.upstream                      # where the OpenAI requests go

Torch-free: the gateway imports it.
"""

from zerostart.serve.backends._base import ColdStart, Memory, WorkerBackend, WorkerError
from zerostart.serve.backends._upstream import UpstreamError, UpstreamPool, UpstreamResponse
from zerostart.serve.backends._command import CommandWorker
from zerostart.serve.backends._measure import device_total_bytes, host_bytes_of_tree
from zerostart.serve.backends._foreign import ForeignWorker
from zerostart.serve.backends._llamacpp import LlamacppWorker, find_server as find_llama_server
from zerostart.serve.backends._log_phases import LogPhases
from zerostart.serve.backends._sglang import SglangWorker
from zerostart.serve.backends._vllm import VllmWorker
from zerostart.serve.backends._zerostart import ZerostartWorker

# The config's `backend:` value -> its class. A new backend is one module in this package and
# one entry here.
BACKENDS: dict[str, type[WorkerBackend]] = {
    ZerostartWorker.name: ZerostartWorker,
    VllmWorker.name: VllmWorker,
    SglangWorker.name: SglangWorker,
    LlamacppWorker.name: LlamacppWorker,
    CommandWorker.name: CommandWorker,
}

__all__ = ["BACKENDS", "ColdStart", "CommandWorker", "ForeignWorker", "LlamacppWorker", "LogPhases", "Memory",
           "SglangWorker", "UpstreamError", "UpstreamPool", "UpstreamResponse", "VllmWorker", "WorkerBackend",
           "WorkerError", "ZerostartWorker", "backend_class", "device_total_bytes", "find_llama_server",
           "host_bytes_of_tree"]


def backend_class(name: str) -> type[WorkerBackend]:
    """The backend registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})") from None
