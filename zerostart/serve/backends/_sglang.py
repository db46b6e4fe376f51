"""The ``sglang`` backend: SGLang's server, ``python -m sglang.launch_server`` (``sglang.python``,
``sglang.module``).

- Readiness: ``GET /health`` answers 200 (SGLang listens once its scheduler has loaded the
  model, and answers 503 until its warm-up request is done). Phases: its log lines
  (``_log_phases.SGLANG_MARKERS``: weights, KV cache, "fired up").
- Memory share (CUDA): ``--mem-fraction-static`` = the replica's share / the GPU's memory.
- Parking (CUDA): ``--enable-memory-saver`` and its routes ``POST /release_memory_occupation``
  and ``POST /resume_memory_occupation`` (weights and KV cache released, the process, its CUDA
  graphs and context kept). SGLang's memory saver is CUDA-only: on CPU its replicas stop.

Not run against the real SGLang here: its PyPI wheels are CUDA builds, and its CPU backend is
built from source for Intel AMX CPUs. The tests drive a stand-in that speaks its routes and
prints its log lines (tests/serve/_sglang_standin.py).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING

import httpx

from zerostart import weights
from zerostart.names import is_remote
from zerostart.serve.edge import StartFailed
from zerostart.serve.backends import _measure
from zerostart.serve.backends._base import ColdStart, WorkerError
from zerostart.serve.backends._foreign import ForeignWorker
from zerostart.serve.backends._log_phases import SGLANG_DETAILS, SGLANG_LAST, SGLANG_MARKERS
from zerostart.serve.backends._process import CONNECT_TIMEOUT_S, Moment
from zerostart.serve.control import ParkResult, Refusal

if TYPE_CHECKING:
    from zerostart.serve._config import ModelConfig


class SglangWorker(ForeignWorker):
    name = "sglang"
    engine = "SGLang"
    health_path = "/health"
    markers = SGLANG_MARKERS
    details = SGLANG_DETAILS
    last_phase = SGLANG_LAST

    def __init__(self, model, server, socket_dir) -> None:
        super().__init__(model, server, socket_dir)
        assert self.model is not None and self.model.sglang is not None
        self.options = self.model.sglang
        self.python = self.options.python or sys.executable
        self._released = False
        self._launch: tuple[str, list[str]] | None = None  # --model-path, memory args

    @classmethod
    def parking(cls, model: ModelConfig) -> Refusal | None:
        if not model.device.startswith("cuda"):
            return Refusal(code="not_parkable", message=f"SGLang releases memory with its memory saver, which needs "
                           f"CUDA (the model is on {model.device}); its replicas stop instead of parking")
        return None

    async def start(self, *, parkable: bool) -> ColdStart:
        self.parkable = parkable
        self._launch = await asyncio.to_thread(self._prepare)
        return await super().start(parkable=parkable)

    def _prepare(self) -> tuple[str, list[str]]:
        m = self.model
        assert m is not None
        if is_remote(m.path):
            raise StartFailed(f"model {m.served_name!r}: SGLang reads local checkpoints and hf:// (its own hub "
                              f"cache); pull {m.path} first (zerostart pull) and serve the local copy", cause="spawn")
        path = m.path
        if path.startswith("hf://"):
            path = weights.localize(path)
        memory: list[str] = []
        total = _measure.device_total_bytes(m.device)
        if self.memory_share and total:
            memory = ["--mem-fraction-static", f"{max(0.02, min(0.95, self.memory_share / total)):.4f}"]
        return path, memory

    def argv(self, host: str, port: int) -> list[str]:
        m = self.model
        assert m is not None and self._launch is not None
        path, memory = self._launch
        # --opt=value throughout: a path or name that starts with "-" stays a value
        cmd = [self.python, "-m", self.options.module, f"--model-path={path}", f"--served-model-name={m.served_name}",
               f"--host={host}", f"--port={port}", f"--device={m.device.partition(':')[0]}", "--enable-metrics"]
        if m.dtype:
            cmd.append(f"--dtype={m.dtype}")
        if m.max_model_len:
            cmd.append(f"--context-length={m.max_model_len}")
        cmd += memory
        if self.parkable and m.device.startswith("cuda"):
            cmd.append("--enable-memory-saver")
        return cmd + list(self.options.args)

    async def park(self, timeout: float) -> ParkResult | Refusal:
        refusal = self.parking(self.model)
        if refusal is not None:
            return refusal
        if not self.parkable:
            return Refusal(code="not_parkable", message="this SGLang replica was started without --enable-memory-saver")
        if self._released:
            return ParkResult(changed=False)
        t0 = time.perf_counter()
        await self._post("/release_memory_occupation", "releasing SGLang's memory", timeout)
        self._released = True
        return ParkResult(changed=True, park_s=time.perf_counter() - t0)

    async def wake(self, timeout: float) -> ColdStart:
        begin = Moment.now()
        await self._post("/resume_memory_occupation", "resuming SGLang's memory", timeout)
        self._released = False
        return self._wake_cold_start(begin, how="SGLang resume_memory_occupation")

    async def _post(self, path: str, doing: str, timeout: float) -> None:
        client = self.process.client
        assert client is not None
        try:
            r = await client.post(path, json={}, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S))
        except httpx.HTTPError as e:
            raise WorkerError(f"{doing} (pid {self.pid}) failed: {e!r}") from None
        if r.status_code != 200:
            raise WorkerError(f"{doing} (pid {self.pid}) failed: HTTP {r.status_code} {r.text[:300]}")
