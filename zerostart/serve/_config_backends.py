"""The serve config's per-backend sections: how the gateway runs vLLM, SGLang, llama.cpp or any
OpenAI server for a model (``models[].vllm``, ``.sglang``, ``.llamacpp``, ``.command``)."""

from __future__ import annotations

import shlex
from typing import Literal

from pydantic import Field, field_validator

from zerostart.serve._config_base import Bytes, Section


class VllmOptions(Section):
    """``backend: vllm``: vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``)."""

    python: str | None = None  # the Python of vLLM's environment; None: the gateway's own
    args: list[str] = []  # more vLLM arguments, as on its command line (e.g. ["--enforce-eager"])
    # auto: zerostart's loader (--load-format zerostart) where zerostart is installed in vLLM's
    # environment, else vLLM's default; or any vLLM --load-format value
    load_format: str = "auto"
    sleep_level: Literal[1, 2] = 1  # CUDA parking: 1 weights to host RAM; 2 weights dropped (reloaded on wake)
    # CPU: host memory vLLM's processes hold besides weights and KV cache (subtracted from the
    # replica's memory share to size --kv-cache-memory-bytes; measured ~2.4 GB for vLLM 0.32)
    runtime_bytes: Bytes = 2_400_000_000


class SglangOptions(Section):
    """``backend: sglang``: SGLang's server (``python -m sglang.launch_server``)."""

    python: str | None = None  # the Python of SGLang's environment; None: the gateway's own
    module: str = "sglang.launch_server"  # what ``python -m`` runs
    args: list[str] = []  # more SGLang arguments (e.g. ["--attention-backend", "torch_native"])


# llama-server options zerostart sets itself (the model, where it listens, its key, its metrics)
_LLAMACPP_OWN = ("-m", "--model", "-a", "--alias", "--host", "--port", "--api-key", "--api-key-file", "--metrics",
                 "-np", "--parallel", "-t", "--threads", "-tb", "--threads-batch", "-c", "--ctx-size",
                 "--kv-unified-per-slot", "--embedding", "--embeddings", "--pooling", "--embd-normalize", "-hf",
                 "--hf-repo", "-mu", "--model-url")


class LlamacppOptions(Section):
    """``backend: llamacpp``: llama.cpp's ``llama-server`` on a GGUF file (``make llamacpp-env``)."""

    # the llama-server binary; null: .venvs/llamacpp/bin/llama-server of this checkout (make
    # llamacpp-env), else llama-server on PATH
    server: str | None = None
    file: str | None = None  # hf:// sources: the .gguf file of the repository (needed when it holds several)
    parallel: int = Field(4, ge=1)  # slots (-np): sequences decoded together; more requests wait in its queue
    # KV cache size in tokens shared by the slots (-c); null: parallel x max_model_len when that is
    # set, else the model's training context
    ctx_size: int | None = Field(None, ge=1)
    # more llama-server arguments, after zerostart's (the last value of an option wins: e.g.
    # ["--n-gpu-layers", "20"] offloads part of a model on CUDA)
    args: list[str] = []

    @field_validator("args")
    @classmethod
    def _args(cls, args: list[str]) -> list[str]:
        own = [a for a in args if a.split("=", 1)[0] in _LLAMACPP_OWN]
        if own:
            raise ValueError(f"{', '.join(own)}: set by zerostart (the model's path, name, threads, max_model_len, "
                             "embedding and the llamacpp keys say what it passes); remove it from args")
        return args


class CommandOptions(Section):
    """``backend: command``: any OpenAI-compatible server, started from a command template."""

    # the command line; {model} {name} {host} {port} {device} {memory_bytes} are filled in
    run: list[str] | str
    ready_path: str = "/health"  # answers 200 once it serves (llama.cpp /health, TGI /health, vLLM /health)
    checkpoint: bool = True  # CUDA: park it with the CUDA checkpoint API (driver R550+)

    @field_validator("run")
    @classmethod
    def _run(cls, run: list[str] | str) -> list[str]:
        argv = shlex.split(run) if isinstance(run, str) else list(run)
        if not argv:
            raise ValueError("needs the server's command line, e.g. llama-server -m {model} --host {host} --port {port}")
        if not any("{port}" in a for a in argv):
            raise ValueError("the command must take the port zerostart chooses: put {port} in it")
        try:
            [a.format(model="", name="", host="", port=0, device="", memory_bytes=0) for a in argv]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"unknown placeholder {e} (known: {{model}} {{name}} {{host}} {{port}} {{device}} "
                             "{memory_bytes}; write {{ and }} for literal braces)") from None
        return argv

    @field_validator("ready_path")
    @classmethod
    def _ready_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"must be a path on the server, starting with '/', got {path!r}")
        return path
