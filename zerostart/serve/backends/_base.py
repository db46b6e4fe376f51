"""The interface every backend implements: how the gateway starts one replica of a model on
some engine, tells it is ready, reads its cold-start phases, parks and wakes it (if it can),
measures its memory and stops it. llama-swap's ``Process``, in Python.

The fleet owns the replica's lifecycle (``serve/gateway/_state.py``) and calls, in order::

    start(parkable=...)         -> ColdStart   spawn, wait until it serves requests (StartFailed otherwise)
    measure_memory()            -> Memory      device bytes it holds, for the memory budget
    probe(parked=...)           -> str | None  alive, and in the state the gateway put it? (the watchdog)
    park(timeout)               -> ParkResult | Refusal      (Refusal: nothing changed, and why)
    wake(timeout)               -> ColdStart   the wake's phases (WorkerError: stop it)
    stop(timeout) / kill()                     SIGTERM then SIGKILL / SIGKILL at once

``current_phase()`` says where a start is (for timeout messages); ``on_exit`` is called when the
process exits unasked (a crash). A backend is one module in this package and one entry in
``BACKENDS`` (``__init__.py``); the config names it per model (``backend:``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import httpx

import zerostart
from zerostart.names import Climb, Rung
from zerostart.serve.backends._process import WorkerProcess, inherited_env
from zerostart.serve.control import TOKEN_ENV, ImageReport, KVCapacity, ParkResult, Refusal
from zerostart.telemetry import Timeline

if TYPE_CHECKING:
    from zerostart.serve._config import ModelConfig, ServerConfig
    from zerostart.serve.edge import ServeError
    from zerostart.serve.backends._upstream import UpstreamPool

_ids = itertools.count(1)


class WorkerError(RuntimeError):
    """A park or wake failed, or the worker could not be reached: stop the worker."""


@dataclass
class ColdStart:
    """One climb to ready (a start, a hand-over to a spare, a wake), as the backend measured it."""

    timeline: Timeline  # its phases, from when it was asked for (spawn, hand-over or wake)
    climb: Climb  # what it climbed from (and whether the standby worker took it)
    image: ImageReport | None = None  # what the worker did with ready images (None: no images)
    standby: dict[str, Any] | None = None  # a spare's own start, paid before this climb
    max_model_len: int | None = None  # the context the replica serves, when its engine says
    kv: KVCapacity | None = None  # what its KV cache holds, when its engine says


@dataclass(frozen=True)
class Memory:
    """Device bytes one replica holds, as measured (not estimated)."""

    held_bytes: int  # while hot: weights, KV cache, whatever else the engine keeps on the device
    parked_bytes: int  # while parked: what stays on the device (0 on an accelerator; the weights on CPU)


class WorkerBackend(ABC):
    """One replica's worker process of some engine, as the gateway drives it."""

    name: ClassVar[str]  # the config's ``backend:`` value, and its key in ``BACKENDS``

    def __init__(self, model: ModelConfig | None, server: ServerConfig, socket_dir: str) -> None:
        self.model = model
        self.server = server
        self.id = next(_ids)
        self.on_exit: Callable[[], None] = lambda: None  # the fleet's: the process exited unasked
        self.memory_share: int | None = None  # device bytes this replica may hold (the fleet sets it)
        self.threads: int | None = None  # the CPU compute threads the fleet gives it (None: its engine's choice)
        label = model.served_name if model is not None else "standby"
        backlog = model.max_concurrency * 2 if model is not None else 0
        self.process = WorkerProcess(label, server, socket_dir, lambda: self.on_exit(), id=self.id, backlog=backlog)

    # -- what the fleet reads ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def address(self) -> str | None:
        """Where it listens: ``unix:/path`` or ``http://host:port``."""
        return self.process.address

    @property
    def upstream(self) -> UpstreamPool | None:
        """Where the gateway sends the OpenAI requests, once started."""
        return self.process.upstream

    @property
    def exited(self) -> asyncio.Event:
        return self.process.exited

    @classmethod
    def parking(cls, model: ModelConfig) -> Refusal | None:
        """Whether replicas of ``model`` can be parked at all, known before one runs: None if
        they can (a worker may still refuse at park time), else why not."""
        return None

    @classmethod
    def refuse(cls, model: ModelConfig, path: str, request: Any) -> ServeError | None:
        """Why this backend cannot serve ``request`` (the parsed body of ``POST path``) for
        ``model``, known before a replica starts: the gateway answers with it at once (400, or
        501 for a route the engine lacks), instead of starting a replica to be told. None: it can."""
        return None

    @classmethod
    def missing_rungs(cls, model: ModelConfig) -> dict[Rung, str]:
        """The rungs of the cold ladder (PARKED, IMAGE) this backend cannot rest replicas of
        ``model`` on, with why: the policies skip them, the status shows them."""
        refusal = cls.parking(model)
        return {Rung.PARKED: refusal.message} if refusal is not None else {}

    # -- climbing ---------------------------------------------------------------------------

    @abstractmethod
    async def start(self, *, parkable: bool) -> ColdStart:
        """Spawn the worker and return once it serves requests; ``parkable``: load so that it
        can be parked. Raises ``StartFailed`` naming the cause; the caller enforces the start
        timeout (and kills the worker when it runs out)."""

    @abstractmethod
    async def current_phase(self) -> str:
        """What the worker is doing now (for timeout messages); the last known phase if it
        does not answer at once."""

    @abstractmethod
    async def measure_memory(self) -> Memory | None:
        """Device bytes it holds now that it is ready; None when it cannot tell."""

    # -- watching a running worker ----------------------------------------------------------

    async def probe(self, *, parked: bool) -> str | None:
        """Whether the worker is alive and where the gateway put it (``parked`` or serving):
        None if so, else what is wrong. The caller bounds the time it may take (a worker that
        does not answer is hung: ``server.worker_probe_timeout``, the only deadline, so no
        shorter one of the HTTP client's may decide). This default asks ``GET /health`` for a 200."""
        client = self.process.client
        if client is None:
            return "it has no address"
        try:
            r = await client.get("/health", timeout=None)
        except httpx.HTTPError as e:
            return f"its health route could not be reached ({type(e).__name__}: {e})"
        return None if r.status_code == 200 else f"its health route answered HTTP {r.status_code}"

    def engine_metrics(self) -> dict[str, float] | None:
        """The engine's own counters as last read (status shows them); None: it reports none."""
        return None

    async def image_report(self) -> ImageReport | None:
        """What the worker did with ready images now (a write in the background moves on after
        the start); None for a backend without images."""
        return None

    # -- parking ----------------------------------------------------------------------------

    @abstractmethod
    async def park(self, timeout: float) -> ParkResult | Refusal:
        """Release its device memory, keeping the process. A :class:`Refusal` means nothing
        changed (it still serves); raises :class:`WorkerError` when the park failed."""

    @abstractmethod
    async def wake(self, timeout: float) -> ColdStart:
        """Bring a parked worker back; its phases are this climb's. Raises
        :class:`WorkerError` when the wake failed (stop the worker then)."""

    # -- stopping ---------------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is gone."""
        await self.process.stop(timeout)

    async def kill(self) -> None:
        await self.process.kill()

    def crash_message(self) -> str:
        """For requests that were in flight when the worker died."""
        return (self.process.exit_message("while serving this request")
                + ". Retry: the next request starts a new worker.")

    # -- for subclasses ---------------------------------------------------------------------

    def child_env(self) -> dict[str, str]:
        """The environment of the worker process: the gateway's, the model's ``env``, this
        checkout of zerostart first on the path, and the worker's token (``TOKEN_ENV``)."""
        env = inherited_env()
        if self.model is not None:
            env.update(self.model.env)
        env[TOKEN_ENV] = self.process.token
        root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env
