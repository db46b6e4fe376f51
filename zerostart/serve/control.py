"""The gateway <-> worker control protocol: the bodies of a zerostart worker's control routes,
typed, imported by both sides (the worker writes them, ``serve.backends`` reads them). Torch-free.

Routes (docs/serve.md has the JSON)::

    GET  /zerostart/ready?wait=S   -> ReadyReport   200 standby|ready|parked, 503 while moving, 500 failed
    GET  /zerostart/phases         -> PhasesReport  the latest cold start (load or wake) on one clock
    POST /zerostart/load           <- LoadSpec      a standby worker becomes a worker of that model
                                   -> LoadAccepted  202
    POST /zerostart/park           -> ParkResult    200; 409 Refusal (busy, not_ready, not_parkable)
    POST /zerostart/wake           -> WakeResult    200; 409 not_ready; 500 wake_failed

What a worker loads is one :class:`LoadSpec`, built from the model's config entry by
:func:`load_spec`: a worker the gateway spawns gets it as ``--spec=JSON``, a standby worker as
the body of ``POST /zerostart/load``; the worker reads it in one place (``worker/_loading.py``).
Its ``engine_options`` are the engine's own typed ``EngineConfig``: an engine setting crosses
the boundary without this module knowing it.

Every OpenAI answer of a worker ends with its :class:`RequestStats` (what the request cost the
engine: tokens, finish reasons, time waiting for a slot, inter-token gaps), for the gateway's
metrics: a ``x-zerostart-stats`` header on a whole response, an SSE comment
(``: x-zerostart-stats {...}``) before ``data: [DONE]`` on a stream.

Errors are OpenAI-shaped (:class:`ErrorBody`). Reports are dumped with ``exclude_none``: a
field a state does not have is absent, not null. Every request carries
``Authorization: Bearer <token>``, the token the gateway gave the worker in the environment
variable :data:`TOKEN_ENV`; anything else gets 401.

A worker's states (the gateway's replica states are in ``serve/gateway/_state.py``)::

    starting -> loading    a plain worker: imports, then the load, right away
    starting -> standby    --standby: torch and the engine imported, the device initialized
    starting -> failed     the imports or the device init failed
    standby  -> loading    POST /zerostart/load names the model
    loading  -> ready      the engine is loaded and warmed up: requests are served
    loading  -> failed     the load failed (the error is reported; the gateway stops us)
    ready    -> parking    POST /zerostart/park with nothing in flight
    parking  -> parked     weights in host RAM, KV cache dropped; the process and graphs stay
    parking  -> ready      refused (a request still running, or not parkable): nothing changed
    parking  -> failed     the park itself failed
    parked   -> waking     POST /zerostart/wake
    waking   -> ready      weights back at the same addresses
    waking   -> failed     the wake failed
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from zerostart.engine import EngineConfig
from zerostart.names import Climb, Dtype, ImageMode, normalize_device
from zerostart.serve._config import EmbeddingConfig, ModelConfig, default_name

__all__ = [
    "SETTLED",
    "TOKEN_ENV",
    "WORKER_TRANSITIONS",
    "ErrorBody",
    "ErrorDetail",
    "ImageReport",
    "InFlight",
    "KVCapacity",
    "LoadAccepted",
    "LoadRecord",
    "LoadSpec",
    "ParkResult",
    "PhasesReport",
    "ITL_BUCKETS",
    "ReadyReport",
    "Refusal",
    "RequestStats",
    "STATS_HEADER",
    "WakeResult",
    "WorkerState",
    "check_worker",
    "load_spec",
]


TOKEN_ENV = "ZEROSTART_WORKER_TOKEN"  # the worker's secret, from its gateway


class WorkerState(str, enum.Enum):
    STARTING = "starting"  # importing (and, for a standby worker, initializing its device)
    STANDBY = "standby"  # imports and device init done; waiting for POST /zerostart/load
    LOADING = "loading"  # loading the model (from its ready image or its source)
    READY = "ready"  # serving requests
    FAILED = "failed"  # the load, a park or a wake failed: the gateway stops this worker
    PARKING = "parking"  # moving the weights to host RAM
    PARKED = "parked"  # weights in host RAM, KV cache dropped; serves nothing
    WAKING = "waking"  # weights coming back; requests wait for it


WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.LOADING, WorkerState.STANDBY, WorkerState.FAILED}),
    WorkerState.STANDBY: frozenset({WorkerState.LOADING}),
    WorkerState.LOADING: frozenset({WorkerState.READY, WorkerState.FAILED}),
    WorkerState.READY: frozenset({WorkerState.PARKING}),
    WorkerState.PARKING: frozenset({WorkerState.PARKED, WorkerState.READY, WorkerState.FAILED}),
    WorkerState.PARKED: frozenset({WorkerState.WAKING}),
    WorkerState.WAKING: frozenset({WorkerState.READY, WorkerState.FAILED}),
    WorkerState.FAILED: frozenset(),
}

# The states a long poll of /zerostart/ready waits for (the others are on their way somewhere).
SETTLED = frozenset({WorkerState.STANDBY, WorkerState.READY, WorkerState.PARKED, WorkerState.FAILED})


def check_worker(src: WorkerState, dst: WorkerState) -> None:
    """Raise ``RuntimeError`` for a move the table above does not allow (a bug in the worker)."""
    if dst not in WORKER_TRANSITIONS[src]:
        raise RuntimeError(f"worker: {src.value} -> {dst.value} is not a worker transition")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the gateway reads what it knows of the worker's reports

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# -- what one OpenAI request cost --------------------------------------------------------------

STATS_HEADER = "x-zerostart-stats"
# vLLM's buckets for vllm:inter_token_latency_seconds (so its dashboards' quantiles carry over)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)


class RequestStats(_Body):
    """What one OpenAI request cost the engine (all its sequences: prompts times ``n``)."""

    prompt_tokens: int = 0  # each prompt once
    generation_tokens: int = 0
    finished: dict[str, int] = {}  # the engine's finish reason (stop, length, abort) -> sequences
    queue_s: float = 0.0  # the longest any of its sequences waited for a KV cache slot
    first_token_s: float | None = None  # submit to the first generated token; None: nothing generated
    itl_counts: list[int] = []  # gaps between consecutive tokens of a sequence, per ITL_BUCKETS (+Inf last)
    itl_sum: float = 0.0

    def to_header(self) -> str:
        return self.model_dump_json(exclude_none=True)


# -- requests ---------------------------------------------------------------------------------


class LoadSpec(BaseModel):
    """What a worker loads, and how. The defaults are those of a worker driven by hand; the
    gateway sets every field from the model's config entry (:func:`load_spec`)."""

    model_config = ConfigDict(extra="forbid")

    model: str  # a model directory, .safetensors or .gguf file, ready image, or hf:// s3:// https:// source
    name: str = ""  # the served name; empty: the model directory's (or file's) name
    device: str = "cpu"
    dtype: Dtype | None = None  # None: the engine's choice for the device
    images: ImageMode = "off"  # a worker driven by hand touches no image store unless asked
    parkable: bool = False  # load so that it can be parked (CUDA: VMM memory)
    engine_options: EngineConfig = Field(default_factory=EngineConfig)  # the engine's own settings, typed there
    embedding: EmbeddingConfig | None = None  # an embedding model: how it pools (None: it generates text)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return normalize_device(device)

    @model_validator(mode="after")
    def _name(self) -> LoadSpec:
        if not self.name:
            self.name = default_name(self.model)
        return self


def load_spec(model: ModelConfig, *, parkable: bool, kv_cache_bytes: int | None = None,
              threads: int | None = None) -> LoadSpec:
    """What a worker of ``model`` loads: its config entry, with what the fleet decided for this
    replica (whether it must be parkable, the KV cache and CPU threads it sized for it)."""
    return LoadSpec(model=model.path, name=model.served_name, device=model.device, dtype=model.dtype,
                    images=model.images, parkable=parkable, embedding=model.embedding,
                    engine_options=model.engine_config(kv_cache_bytes=kv_cache_bytes, threads=threads))


class LoadAccepted(_Body):
    state: Literal["loading"] = "loading"
    model: str
    name: str


# -- reports ----------------------------------------------------------------------------------


class ImageReport(_Body):
    """What a worker did with ready images.

    ``status``: ``off``, ``is_source`` (the model path is an image), ``missing``, ``used``,
    ``rejected`` (corrupt or incompatible: the source was loaded), ``unavailable`` (the store
    could not be consulted; ``error`` says why), ``queued``, ``writing``, ``written``,
    ``write_failed`` (``error``). ``rejected`` keeps why an image found at load time was not
    used, also once a new one was written in its place.
    """

    mode: ImageMode = "off"
    path: str | None = None
    status: str = "off"
    error: str | None = None
    rejected: str | None = None
    write_s: float | None = None

    @model_serializer(mode="wrap")
    def _json(self, handler: Any) -> dict[str, Any]:
        d = handler(self)  # mode, path and status always; the rest when set
        out: dict[str, Any] = {"mode": self.mode, "path": self.path, "status": self.status}
        out.update({k: v for k, v in d.items() if k not in out})
        if self.write_s is not None:
            out["write_s"] = round(self.write_s, 4)
        return out


class KVCapacity(_Body):
    """What a worker's KV cache holds (``Engine.kv_stats``): blocks of ``block_tokens``
    positions, taken by sequences as they grow; ``tokens`` is the capacity."""

    tokens: int
    block_tokens: int
    blocks: int
    slots: int  # sequences that may run at once
    bytes: int
    paged: bool  # memory is taken block by block (else every slot is backed in full)
    dtype: str  # of the keys and values ("bfloat16", ...)


class ReadyReport(_Body):
    """The body of ``GET /zerostart/ready``. A standby worker reports ``pid`` and ``device``; a
    worker holding a model (ready, parking, parked, waking) everything up to ``image``; one
    still moving only ``state`` and ``phase``; a failed one its ``error``."""

    state: WorkerState
    phase: str
    model: str | None = None  # the served name
    source: str | None = None
    pid: int | None = None
    device: str | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    rung: Climb | None = None  # where its latest cold start climbed from
    parkable: bool | None = None
    parked: bool | None = None
    weights_bytes: int | None = None  # device bytes of the weights arena
    kv_bytes: int | None = None  # device bytes of the KV cache
    kv: KVCapacity | None = None  # what the KV cache holds
    image: ImageReport | None = None
    parkable_error: str | None = None  # why a model asked to be parkable is not
    error: str | None = None  # state failed: what failed
    # the engine's progress, for the gateway's probe: a step count that must move while sequences wait or run
    engine_steps: int | None = None
    engine_sequences: int | None = None  # running or waiting


class PhaseJSON(_Body):
    """One phase of a cold start (``zerostart.telemetry.Phase.to_dict``)."""

    name: str
    start_s: float
    end_s: float
    seconds: float = 0.0
    bytes: int | None = None
    gbps: float | None = None
    detail: dict[str, Any] | None = None


class LoadRecord(_Body):
    """The load's own timeline, kept once a wake became the latest cold start."""

    rung: Climb | None
    requested_s: float
    phases: list[PhaseJSON]


class PhasesReport(_Body):
    """The body of ``GET /zerostart/phases``: the latest cold start (the load, or the latest
    wake), in seconds since ``origin_unix`` (when the worker began running our code)."""

    origin_unix: float
    state: WorkerState
    rung: Climb | None = None
    requested_s: float = 0.0  # when this cold start was asked for (0: at spawn)
    phases: list[PhaseJSON]
    timeline: dict[str, Any]  # zerostart.telemetry.Timeline.to_dict
    image: ImageReport
    load: LoadRecord | None = None

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d.setdefault("load", None)  # present (null) until a wake
        d.setdefault("rung", None)
        return d


class ParkResult(_Body):
    """200 of ``POST /zerostart/park``. ``changed: false``: it was parked already."""

    state: Literal["parked"] = "parked"
    changed: bool
    park_s: float | None = None
    bytes: int | None = None  # weights moved to host RAM
    gbps: float | None = None
    kv_bytes: int | None = None  # KV cache dropped
    waited_s: float | None = None  # waiting for a background image write to finish reading the weights


class WakeResult(_Body):
    """200 of ``POST /zerostart/wake``. ``changed: false``: it was not parked (or another wake
    was under way, and this answer came once that one was done)."""

    state: Literal["ready"] = "ready"
    changed: bool
    wake_s: float | None = None
    bytes: int | None = None
    gbps: float | None = None


# -- refusals and errors ----------------------------------------------------------------------


class Refusal(_Body):
    """A typed "cannot, because ...": the worker did not do what was asked and nothing changed.
    ``busy``: requests are in flight (try later); ``not_ready``: loading, standby or failed;
    ``not_parkable``: it can never park (why is in ``message``): stop it instead."""

    code: Literal["busy", "not_ready", "not_parkable"]
    message: str

    @property
    def permanent(self) -> bool:
        return self.code == "not_parkable"


class InFlight(_Body):
    id: int
    method: str
    path: str
    age_s: float


class ErrorDetail(_Body):
    message: str
    type: str = "server_error"
    param: str | None = None
    code: str | None = None


class ErrorBody(_Body):
    """OpenAI's error shape, plus what a refused park names (the requests in flight)."""

    error: ErrorDetail
    in_flight: list[InFlight] | None = None

    def to_json(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude_none=True)
        d["error"] = self.error.model_dump(mode="json")  # param and code present, if null
        return d
