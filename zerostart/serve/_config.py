"""The ``zerostart serve`` configuration: one YAML file, typed and validated.

Every default lives here and only here, with the backends' sections in ``_config_backends`` and
the cluster's in ``_config_cluster`` (``examples/config.yaml`` documents them; a test keeps the
two in step). Unknown keys are errors, and every error names the key that is wrong::

    zerostart: error: config.yaml: models[0].idle_timout: unknown key (did you mean 'idle_timeout'?)

The smallest useful file::

    models:
      - path: ~/models/llama-3.2-1b
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from zerostart.engine import EngineConfig
from zerostart.names import (DEFAULT_IMAGE_MODE, Dtype, ImageMode, KvDtype, Quantize, Scheme, is_local, normalize_device,
                             source_scheme)
from zerostart.serve._config_backends import CommandOptions, LlamacppOptions, SglangOptions, VllmOptions
from zerostart.serve._config_base import Bytes, BytesOrAuto, KeepAlive, Seconds, Section
from zerostart.serve._config_cluster import ClusterConfig
from zerostart.serve._keys import describe_errors


API_KEYS_ENV = "ZEROSTART_API_KEYS"  # more server.api_keys, comma-separated, from the environment


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the key."""


# The engines a model's workers can run: one module each in serve/backends, registered in its
# BACKENDS under the same name.
Backend = Literal["zerostart", "vllm", "sglang", "llamacpp", "command"]


def default_name(path: str) -> str:
    """A model's name when the config gives none: its directory's (or file's, without
    ``.safetensors`` or ``.gguf``) name; for a source URL its last path component
    (``hf://org/name@rev``: ``name``)."""
    if not is_local(path):
        base = path.split("://", 1)[1].rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0]
        return base.removesuffix(".safetensors").removesuffix(".gguf") or path
    base = os.path.basename(os.path.normpath(path))
    return base.removesuffix(".safetensors").removesuffix(".gguf") or base


class CorsConfig(Section):
    """Cross-origin requests from browsers (starlette's CORSMiddleware). Off unless origins are listed."""

    allow_origins: list[str] = []  # e.g. ["https://app.example.com"], or ["*"]; empty: no CORS headers at all
    allow_methods: list[str] = ["GET", "POST", "DELETE", "OPTIONS"]
    allow_headers: list[str] = ["authorization", "content-type"]
    allow_credentials: bool = False
    max_age: int = Field(600, ge=0)  # seconds a browser may cache a preflight answer


class ResponsesStoreConfig(Section):
    """The gateway's memory of /v1/responses answers, for ``previous_response_id`` and
    ``GET /v1/responses/{id}``: in memory, by tenant, oldest out first, gone on restart."""

    max_items: int = Field(1000, ge=0)  # responses kept; 0: none (previous_response_id is then always unknown)
    max_bytes: Bytes = Field(256 * 1024 * 1024, ge=1)  # their JSON (response + conversation) past this: oldest out
    ttl: Seconds = Field(3600.0, gt=0)  # a response is forgotten this long after it was made


class TenantConfig(Section):
    """Keys that share what they store (a team, an application): one tenant (docs/serve.md, Tenants)."""

    name: str = Field(min_length=1)
    keys: list[str] = Field(min_length=1)  # bearer tokens, as in api_keys
    admin: bool = False  # may read the whole server's state: GET /zerostart/status and /metrics

    @field_validator("keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        return _api_keys(keys)


class ServerConfig(Section):
    """The gateway process: where it listens, who may call it, how it talks to its workers."""

    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port (printed at start)
    api_keys: list[str] = []  # bearer tokens, each a tenant of its own; empty (and no tenants): no authentication
    tenants: list[TenantConfig] = []  # named tenants grouping keys; admin: true for the operators' (status, metrics)
    worker_transport: Literal["unix", "tcp"] = "unix"  # how the gateway reaches its workers
    worker_host: str = "127.0.0.1"  # the address tcp workers listen on (a free port each)
    socket_dir: str | None = None  # where unix workers' sockets live; None: a private temp dir
    stream_keepalive: Seconds = Field(10.0, gt=0)  # SSE comment interval while a stream waits
    shutdown_timeout: Seconds = 10.0  # how long shutdown waits for open requests to finish
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # -- limits: what one client can ask of the server (docs/serve.md, "Limits") -------------
    allow_unauthenticated: bool = False  # listen beyond loopback without api_keys (anyone who can reach it may use it)
    max_body_bytes: Bytes = Field(16 * 1024 * 1024, ge=1)  # a request body past this: 413
    max_sequences: int = Field(256, ge=1)  # prompts x n of one request past this: 400
    max_connections: int = Field(1024, ge=1)  # open client connections; past it the oldest still sending its head goes
    header_timeout: Seconds = Field(10.0, gt=0)  # a request head must arrive within this (also: idle keep-alive)
    body_timeout: Seconds = Field(60.0, gt=0)  # a request body must arrive within this, else 408
    request_timeout: Seconds = Field(600.0, gt=0)  # a worker taking a request to its last byte; past it: 504 / SSE error + [DONE]
    worker_probe_timeout: Seconds = Field(30.0, gt=0)  # a worker that leaves its health probe unanswered this long is killed
    # a request's response_format / tool grammar: compiled off the worker's event loop, within
    # these (a 400 past either); compile time grows faster than size (~4 s at 100 KB of schema here)
    grammar_timeout: Seconds = Field(10.0, gt=0)
    max_grammar_bytes: Bytes = Field(128 * 1024, ge=1)  # the schema's JSON (or the grammar's text)
    standby_workers: int = Field(0, ge=0, le=1)  # 1: keep a spare worker with imports and device init done
    # host memory a CPU standby worker faults in while it waits; the weights it is handed are read
    # straight into it (at the disk's speed where first-touch faults are slower). Held outside
    # the device budgets. 0: none; auto: the largest memory estimate of the models on its device
    standby_reserve: BytesOrAuto = 0
    metrics_auth: bool = True  # false: GET /metrics answers without an API key (as vLLM guards only /v1)
    dashboard: bool = True  # the fleet's live page at /zerostart/ (behind api_keys like every route); false: off
    cors: CorsConfig = CorsConfig()
    responses_store: ResponsesStoreConfig = ResponsesStoreConfig()

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        return _api_keys(keys)

    @model_validator(mode="after")
    def _one_tenant_per_key(self) -> "ServerConfig":
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenants: names must be unique ({', '.join(sorted(n for n in set(names) if names.count(n) > 1))} "
                             "more than once)")
        keys = [*self.api_keys, *(k for t in self.tenants for k in t.keys)]
        if len(set(keys)) != len(keys):
            raise ValueError("api_keys, tenants: a key appears more than once (each key belongs to one tenant)")
        return self

    @model_validator(mode="after")
    def _exposed(self) -> "ServerConfig":
        if not self.api_keys and not self.tenants and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(f"host {self.host!r} is reachable from other machines and no api_keys are set: anyone who "
                             "can reach it could use every model. Set server.api_keys (clients send 'Authorization: "
                             "Bearer <key>'), or server.allow_unauthenticated: true (--allow-unauthenticated) if "
                             "something in front of it authenticates")
        return self


def _api_keys(keys: list[str]) -> list[str]:
    for k in keys:
        if not k or k != k.strip() or any(c.isspace() for c in k):
            raise ValueError("API keys must be non-empty and contain no whitespace")
    return keys


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only reaches this machine: every address it
    resolves to is a loopback one. A name that does not resolve counts as reachable."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]).is_loopback for i in infos)


class DeviceConfig(Section):
    """One device that models share (``cpu``, ``cuda:0``, ...)."""

    memory_budget: Bytes | None = None  # bytes the models on it may hold together; None: no limit


class PrewarmWindow(Section):
    """Keep a model hot from each time ``cron`` fires (server-local time) for ``duration``."""

    cron: str  # five fields (minute hour day month weekday), or six with seconds last
    duration: Seconds = Field(gt=0)

    @field_validator("cron")
    @classmethod
    def _cron(cls, expr: str) -> str:
        # croniter only for a config with pre-warm windows (a worker reads this schema at its start)
        from croniter import croniter

        if not croniter.is_valid(expr):
            raise ValueError(f"{expr!r} is not a valid cron expression (example: '0 8 * * 1-5' for 08:00 on weekdays)")
        return expr


class EmbeddingConfig(Section):
    """A model served as an embedding model (``/v1/embeddings``; not chat or completions): the
    final hidden states of the input pooled into one vector, as decoder embedders such as
    Qwen3-Embedding use them."""

    pooling: Literal["last", "mean"] = "last"  # the last token's state, or the mean over the input's tokens
    normalize: bool = True  # scale to unit length (cosine similarity is then a dot product)


class ModelConfig(Section):
    """One model the gateway serves, with its lifecycle settings."""

    path: str  # a model directory, .safetensors or .gguf file, ready image, hf://, s3:// or https:// source
    name: str | None = None  # the name clients ask for; None: the directory's (or file's) name
    backend: Backend = "zerostart"  # the engine its workers run (serve/backends)
    device: str = "cpu"
    dtype: Dtype | None = None  # None: the engine's choice for the device
    max_model_len: int | None = Field(None, ge=2)  # longest prompt + completion; None: the engine's default
    kv_cache_bytes: Bytes | None = None  # the engine's KV cache size; None: the engine's default
    # how the engine holds matrices: auto (as stored: a GGUF file's quants stay quantized), none
    # (all floats), int8 | int4 (float matrices quantized at load; a ready image keeps the result)
    quantize: Quantize = "auto"
    # the engine's KV cache dtype: auto (the activations'; bfloat16 on CPU for a quantized model),
    # float32, bfloat16, float16 (CUDA only)
    kv_dtype: KvDtype = "auto"
    # CPU compute threads of each worker; None: the CPUs available less one / the CPU workers that
    # may run at once (the sum of max_replicas of the models on cpu), at least 1
    threads: int | None = Field(None, ge=1)
    embedding: EmbeddingConfig | None = None  # set: an embedding model (/v1/embeddings only); None: generates text
    idle_timeout: KeepAlive = 300.0  # scale to zero after this long idle; negative: never
    park_after: Seconds | None = Field(None, ge=0)  # park (weights to host RAM) after this long idle; None: never
    parkable: bool | None = None  # load so it can be parked (CUDA: VMM memory); None: if park_after or the policy parks
    images: ImageMode = DEFAULT_IMAGE_MODE  # ready images: restore a matching one; write one after a source load
    keep_alive_policy: str | None = None  # a zerostart.policy spec ("ttl:600", "hybrid"); None: idle_timeout
    min_replicas: int = Field(0, ge=0)  # replicas kept hot whatever the traffic
    max_replicas: int = Field(1, ge=1)  # more start when every replica is at max_concurrency
    max_queued: int = Field(512, ge=0)  # requests held waiting; beyond: 429 with Retry-After
    max_concurrency: int = Field(64, ge=1)  # requests in flight per replica
    start_timeout: Seconds = Field(300.0, gt=0)  # spawn to ready; beyond: 504 naming the phase
    stop_timeout: Seconds = 10.0  # a stopping worker is killed after this long
    start_backoff: Seconds = 5.0  # wait after a failed start, doubling per failure ...
    start_backoff_max: Seconds = 300.0  # ... up to this
    memory_estimate: Bytes | None = None  # device bytes a replica holds; None: weights + kv_cache_bytes
    prewarm: list[PrewarmWindow] = []  # windows when the model is kept hot ahead of traffic
    env: dict[str, str] = {}  # extra environment for this model's workers
    vllm: VllmOptions | None = None  # backend: vllm's options
    sglang: SglangOptions | None = None  # backend: sglang's options
    llamacpp: LlamacppOptions | None = None  # backend: llamacpp's options
    command: CommandOptions | None = None  # backend: command's options (run is required)

    @field_validator("path")
    @classmethod
    def _path(cls, path: str, info: ValidationInfo) -> str:
        if not path.strip():
            raise ValueError("must name a model directory or .safetensors file")
        if source_scheme(path) is not Scheme.LOCAL:  # raises for an unknown scheme
            return path
        path = os.path.expanduser(path)
        base = (info.context or {}).get("base_dir")
        if base and not os.path.isabs(path):
            path = os.path.join(base, path)
        return os.path.abspath(path)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None and (not name or any(c.isspace() or not c.isprintable() for c in name)):
            raise ValueError(f"model names must be non-empty without spaces, got {name!r}")
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return normalize_device(device)

    @model_validator(mode="after")
    def _ranges(self) -> "ModelConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.start_backoff > self.start_backoff_max:
            raise ValueError(f"start_backoff ({self.start_backoff:g} s) is above start_backoff_max ({self.start_backoff_max:g} s)")
        if self.park_after is not None and self.parkable is False:
            raise ValueError("park_after is set but parkable is false; remove one of them")
        for key in ("vllm", "sglang", "llamacpp", "command"):
            if getattr(self, key) is not None and self.backend != key:
                raise ValueError(f"{key}: these are options of backend: {key}, and this model's backend is "
                                 f"{self.backend}")
        if self.kv_dtype != "auto" and self.backend != "zerostart":
            raise ValueError(f"kv_dtype: a setting of the zerostart engine; backend {self.backend} takes its own "
                             f"(its args: vLLM's and SGLang's --kv-cache-dtype, llama.cpp's --cache-type-k/-v)")
        if self.kv_dtype == "float16" and self.device == "cpu":
            raise ValueError("kv_dtype: float16 is for CUDA; on the CPU the cache is float32 or bfloat16 (or auto)")
        if self.backend == "command" and self.command is None:
            raise ValueError("backend: command needs command: {run: [...]} (the server's command line)")
        if self.backend == "vllm" and self.vllm is None:
            self.vllm = VllmOptions()
        if self.backend == "sglang" and self.sglang is None:
            self.sglang = SglangOptions()
        if self.backend == "llamacpp":
            if self.llamacpp is None:
                self.llamacpp = LlamacppOptions()
            if self.kv_cache_bytes is not None:
                raise ValueError("kv_cache_bytes: llama.cpp sizes its KV cache in tokens; set llamacpp.ctx_size")
            if self.dtype is not None:
                raise ValueError("dtype: llama.cpp computes in the GGUF file's own types; remove dtype")
        return self

    @property
    def served_name(self) -> str:
        """The name clients use: ``name``, else :func:`default_name` of the path."""
        return self.name or default_name(self.path)

    def engine_config(self, *, kv_cache_bytes: int | None, threads: int | None) -> EngineConfig:
        """The engine settings its workers load with: this entry's, and the KV cache and CPU
        threads the fleet sized for one replica (from this entry's, or its memory share and
        the cores). An engine setting a user may set is a key above and one argument here."""
        return EngineConfig(max_model_len=self.max_model_len, kv_cache_bytes=kv_cache_bytes, threads=threads,
                            quantize=self.quantize, kv_dtype=self.kv_dtype)


class ServeConfig(Section):
    """The whole file."""

    server: ServerConfig = ServerConfig()
    devices: dict[str, DeviceConfig] = {}  # memory budgets per device
    models: list[ModelConfig] = []
    cluster: ClusterConfig = ClusterConfig()  # serving on a Ray cluster instead of this machine

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, devices: Any) -> Any:
        if isinstance(devices, dict):
            return {normalize_device(k): v for k, v in devices.items()}
        return devices

    @model_validator(mode="after")
    def _unique_names(self) -> "ServeConfig":
        seen: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.served_name in seen:
                raise ValueError(f"models[{seen[m.served_name]}] and models[{i}] are both named {m.served_name!r}; "
                                 "give one of them a different 'name'")
            seen[m.served_name] = i
        pooled: dict[str, str] = {}
        for j, pool in enumerate(self.cluster.pools):
            for name in pool.models:
                if name not in seen:
                    raise ValueError(f"cluster.pools[{j}] ({pool.name}): no model named {name!r} in models "
                                     f"(known: {', '.join(seen) or 'none'})")
                if name in pooled:
                    raise ValueError(f"model {name!r} is in two pools ({pooled[name]} and {pool.name})")
                pooled[name] = pool.name
        return self

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.served_name == name:
                return m
        raise KeyError(name)


def load_config(path: str | os.PathLike[str] | None = None, *, data: dict[str, Any] | None = None) -> ServeConfig:
    """Read and validate a YAML config file (or an already parsed mapping). Relative model paths
    are relative to the file's directory."""
    where = os.fspath(path) if path is not None else "config"
    if data is None and path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_Loader)
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with keys server, devices, models")
    base = os.path.dirname(os.path.abspath(where)) if path is not None else os.getcwd()
    data = _with_env_api_keys(data)
    try:
        return ServeConfig.model_validate(data, context={"base_dir": base})
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_errors(e, ServeConfig)}") from None


def _with_env_api_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the keys of :data:`API_KEYS_ENV` (comma-separated) added to
    ``server.api_keys``: keys kept out of the config file (a Kubernetes Secret, a vault)."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    server = data.get("server")
    if not keys or (server is not None and not isinstance(server, dict)):
        return data  # (a server section that is not a mapping gets the schema's error)
    server = dict(server or {})
    listed = server.get("api_keys") or []
    if isinstance(listed, list):  # (anything else gets the schema's error)
        # once: a config read again (the command line's overrides, a cluster's replicas) has them already
        server["api_keys"] = [*listed, *(k for k in keys if k not in listed)]
    return {**data, "server": server}


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true and false. PyYAML follows YAML 1.1, where
    ``off``, ``no``, ``on`` and ``yes`` are booleans too, so ``images: off`` or a model named
    ``no`` would arrive as ``False``."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
