"""The ``llamacpp`` backend: llama.cpp's C++ server, ``llama-server``, on a GGUF file.

    backend: llamacpp
    path: ~/models/smollm2.Q4_1.gguf          # or hf://org/name[@rev] (llamacpp.file: which .gguf)
    llamacpp: {parallel: 4, ctx_size: null, args: []}

- Binary: ``llamacpp.server``, else ``.venvs/llamacpp/bin/llama-server`` of this checkout (``make
  llamacpp-env`` builds the pinned version from source there), else ``llama-server`` on PATH.
- Command line: each option and its value as two words. llama.cpp's parser refuses
  ``--opt=value`` and reads the word after an option as its value whatever it starts with, so a
  path or name beginning with ``-`` stays a value. Threads from the fleet (``--threads``),
  ``--parallel`` slots over one shared KV cache (``--kv-unified``; ``max_model_len`` caps each
  sequence: ``--kv-unified-per-slot``), ``--metrics``, an embedding model with ``--embeddings``.
- Secret: the worker's token goes in a file (mode 0600) in the gateway's socket directory, named
  by ``--api-key-file`` and removed once the server is up: it is in neither ``ps`` nor the
  server's environment. ``/health`` answers anyone; everything else wants the token.
- Ready: ``GET /health`` 200 (it listens at once and answers 503 while it loads). Phases: its log
  lines (``_log_phases.LLAMACPP_MARKERS``).
- Rung: llama.cpp maps the GGUF file, so a start whose file is in the page cache reads no disk:
  the file is its own ready image. A start with most of the file cached (``WARM_FRACTION``)
  climbed from ``image``, else from ``source``; the policies price the two apart.
- Memory: what its process holds (proportional set size on CPU; nvidia-smi on CUDA).
- Parking: on CUDA the CUDA checkpoint API, as for any process. On CPU none: its weights are the
  page cache's pages and its KV cache is in its own memory; stopping it frees both, and SIGSTOP
  frees nothing (docs/backends.md has the numbers).
- Metrics: its ``/metrics``, read at every watchdog probe, in status (``engine_metrics``) under
  vLLM's names where they count the same thing.
- Requests llama-server does not serve as OpenAI's API says are refused before a start (400):
  ``echo``, ``best_of``, ``n`` above its slots, vLLM's ``stop_token_ids``, ``min_tokens``,
  ``repetition_penalty`` (llama.cpp's is ``repeat_penalty``), ``continuous_usage_stats``,
  ``dimensions``; ``/tokenize`` and ``/detokenize`` (its routes take other bodies) get 501.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

import zerostart
from zerostart import weights
from zerostart.names import Climb, Rung, Scheme, source_scheme
from zerostart.serve.backends._base import ColdStart
from zerostart.serve.backends._foreign import ForeignWorker
from zerostart.serve.backends._log_phases import LLAMACPP_DETAILS, LLAMACPP_LAST, LLAMACPP_MARKERS
from zerostart.serve.backends._process import CONNECT_TIMEOUT_S
from zerostart.serve.control import ImageReport, Refusal
from zerostart.serve.edge import BadRequest, NotServed, ServeError, StartFailed

if TYPE_CHECKING:
    from zerostart.serve._config import ModelConfig, ServerConfig

BUILD_DIR = os.path.join(".venvs", "llamacpp", "bin")  # where `make llamacpp-env` puts llama-server
WARM_FRACTION = 0.5  # a start with this much of the GGUF in the page cache climbed from `image`
# llama.cpp's /metrics names -> vLLM's (the gateway's own metrics use vLLM's names)
METRIC_NAMES = {
    "llamacpp:prompt_tokens_total": "vllm:prompt_tokens_total",
    "llamacpp:tokens_predicted_total": "vllm:generation_tokens_total",
    "llamacpp:prompt_tokens_cached_total": "vllm:prefix_cache_hits_total",
    "llamacpp:requests_processing": "vllm:num_requests_running",
    "llamacpp:requests_deferred": "vllm:num_requests_waiting",
}
_ENGINE = "llama.cpp's llama-server"


def find_server(configured: str | None) -> str | None:
    """The llama-server to run: ``configured``, else this checkout's build, else the PATH's."""
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
    built = os.path.join(root, BUILD_DIR, "llama-server")
    if os.access(built, os.X_OK):
        return built
    return shutil.which("llama-server")


class LlamacppWorker(ForeignWorker):
    name = "llamacpp"
    engine = "llama.cpp"
    health_path = "/health"
    markers = LLAMACPP_MARKERS
    details = LLAMACPP_DETAILS
    last_phase = LLAMACPP_LAST

    def __init__(self, model: ModelConfig | None, server: ServerConfig, socket_dir: str) -> None:
        super().__init__(model, server, socket_dir)
        assert self.model.llamacpp is not None
        self.options = self.model.llamacpp
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.process.label)[:40]
        self._key_file = os.path.join(socket_dir, f"{safe}-{self.id}.key")
        self._launch: tuple[str, str, float] | None = None  # llama-server, the GGUF file, its cached fraction
        self._metrics: dict[str, float] | None = None

    # -- what it cannot do, known up front ----------------------------------------------------

    @classmethod
    def missing_rungs(cls, model: ModelConfig) -> dict[Rung, str]:
        refusal = cls.parking(model)
        return {Rung.PARKED: refusal.message} if refusal is not None else {}

    @classmethod
    def parking(cls, model: ModelConfig) -> Refusal | None:
        if model.device.startswith("cuda"):
            return None  # the CUDA checkpoint API (ForeignWorker)
        return Refusal(code="not_parkable", message=(
            "llama.cpp on cpu cannot park: its weights are page-cache pages of the mapped GGUF file and "
            "its KV cache its own memory, so a stop frees what parking would, and SIGSTOP frees nothing; "
            "its replicas stop instead, and restart from the GGUF in the page cache (rung image)"))

    @classmethod
    def refuse(cls, model: ModelConfig, path: str, request: Any) -> ServeError | None:
        if path in ("/tokenize", "/detokenize"):
            return NotServed(f"model {model.served_name!r} runs on the llamacpp backend, whose {path} takes "
                             "another body than vLLM's; it is not served", param="model")
        assert model.llamacpp is not None
        why: tuple[str, str] | None = None
        if getattr(request, "echo", False):
            why = ("echo", "llama-server does not echo the prompt (nor give the prompt's logprobs)")
        elif getattr(request, "best_of", None) is not None:
            why = ("best_of", "llama-server has no best_of")
        elif getattr(request, "n", 1) > model.llamacpp.parallel:
            why = ("n", f"llama-server generates at most llamacpp.parallel ({model.llamacpp.parallel}) choices per "
                        "request")
        elif getattr(request, "stop_token_ids", None):
            why = ("stop_token_ids", "llama-server has no stop_token_ids (use stop strings)")
        elif getattr(request, "min_tokens", 0):
            why = ("min_tokens", "llama-server has no min_tokens")
        elif getattr(request, "repetition_penalty", 1.0) != 1.0:
            why = ("repetition_penalty", "llama-server names it repeat_penalty; send that instead")
        elif getattr(request, "continuous_usage", False):
            why = ("stream_options", "llama-server has no continuous_usage_stats")
        elif getattr(request, "dimensions", None) is not None:
            why = ("dimensions", "llama-server returns the model's full embedding (no dimensions)")
        if why is None:
            return None
        return BadRequest(f"{why[0]}: not supported for model {model.served_name!r}: {why[1]} (backend llamacpp)",
                          param=why[0])

    # -- climbing -----------------------------------------------------------------------------

    async def start(self, *, parkable: bool) -> ColdStart:
        self.parkable = parkable
        # finding the binary, fetching an hf:// file, asking the page cache: off the event loop
        self._launch = await asyncio.to_thread(self._prepare)
        try:
            await asyncio.to_thread(self._write_key)
            cold = await super().start(parkable=parkable)
        finally:
            self._remove_key()  # read at its start: on disk no longer than the start takes
        _, gguf, cached = self._launch
        cold.climb = Climb.IMAGE if cached >= WARM_FRACTION else Climb.SOURCE
        cold.image = ImageReport(mode="off", path=gguf, status="is_source")  # the GGUF is its own image
        first = cold.timeline.phases[0]
        first.detail["page_cache_fraction"] = round(cached, 4)
        slot_ctx = next((p.detail["slot_tokens"] for p in cold.timeline.phases if "slot_tokens" in p.detail), None)
        cold.max_model_len = self.model.max_model_len or slot_ctx
        return cold

    def _prepare(self) -> tuple[str, str, float]:
        m = self.model
        server = find_server(self.options.server)
        if server is None or not os.access(server, os.X_OK):
            where = server or f"{BUILD_DIR}/llama-server or on PATH"
            raise StartFailed(f"model {m.served_name!r}: no llama-server at {where}; build it with `make llamacpp-env` "
                              "or set llamacpp.server", cause="spawn")
        try:
            if source_scheme(m.path) is Scheme.HF:
                gguf: str | None = weights.hf_gguf(m.path, self.options.file)
            elif source_scheme(m.path) is Scheme.LOCAL:
                gguf = weights.gguf_file(m.path)
            else:
                raise StartFailed(f"model {m.served_name!r}: llama.cpp reads local GGUF files and hf://; pull {m.path} "
                                  "first (zerostart pull) and serve the local copy", cause="spawn")
        except (weights.WeightsError, weights.SourceError, OSError) as e:
            hint = " (llamacpp.file names it)" if source_scheme(m.path) is Scheme.HF and not self.options.file else ""
            raise StartFailed(f"model {m.served_name!r}: {e}{hint}", cause="spawn") from None
        if gguf is None:
            raise StartFailed(f"model {m.served_name!r}: llama.cpp serves GGUF files; {m.path} is not one (nor a "
                              "directory holding exactly one)", cause="spawn")
        return server, gguf, weights.cached_fraction(gguf)

    def argv(self, host: str, port: int) -> list[str]:
        m = self.model
        assert self._launch is not None
        server, gguf, _ = self._launch
        cmd = [server, "--model", gguf, "--alias", m.served_name, "--host", host, "--port", str(port),
               "--api-key-file", self._key_file, "--metrics", "--parallel", str(self.options.parallel),
               "--kv-unified", "--no-webui"]
        if m.device.startswith("cuda"):
            cmd += ["--device", "CUDA" + (m.device.partition(":")[2] or "0"), "--n-gpu-layers", "999"]
        else:
            cmd += ["--device", "none"]  # a CUDA build too keeps to the CPU
        if self.threads:
            cmd += ["--threads", str(self.threads), "--threads-batch", str(self.threads)]
        ctx = self.options.ctx_size or (m.max_model_len * self.options.parallel if m.max_model_len else None)
        if ctx:
            cmd += ["--ctx-size", str(ctx)]
        if m.max_model_len:
            cmd += ["--kv-unified-per-slot", str(m.max_model_len)]
        if m.embedding is not None:
            cmd += ["--embeddings", "--pooling", m.embedding.pooling,
                    "--embd-normalize", "2" if m.embedding.normalize else "-1"]  # 2: unit length; -1: none
        return cmd + list(self.options.args)

    def engine_env(self) -> dict[str, str]:
        # the gateway's environment and the model's env; no token in it (the key file has it)
        env = dict(os.environ)
        env.update(self.model.env)
        return env

    def _write_key(self) -> None:
        fd = os.open(self._key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.process.token + "\n")

    def _remove_key(self) -> None:
        try:
            os.unlink(self._key_file)
        except FileNotFoundError:
            pass

    # -- watching -----------------------------------------------------------------------------

    async def probe(self, *, parked: bool) -> str | None:
        """Its health route, then its metrics (kept for status; a failure there is no sickness)."""
        why = await super().probe(parked=parked)
        if why is None:
            await self._read_metrics()
        return why

    async def _read_metrics(self) -> None:
        client = self.process.client
        if client is None:
            return
        try:
            r = await client.get("/metrics", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError:
            return
        if r.status_code != 200:
            return
        try:
            samples = {s.name: float(s.value) for fam in text_string_to_metric_families(r.text) for s in fam.samples
                       if not s.labels}
        except ValueError:
            return
        out = {METRIC_NAMES.get(k, k): v for k, v in samples.items()}
        out["scraped_unix"] = round(time.time(), 3)
        self._metrics = out

    def engine_metrics(self) -> dict[str, float] | None:
        return self._metrics

    async def stop(self, timeout: float) -> None:
        self._remove_key()
        await super().stop(timeout)

    async def kill(self) -> None:
        self._remove_key()
        await super().kill()
