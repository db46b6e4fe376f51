"""A foreign engine's OpenAI server as a replica: vLLM, SGLang, or any command (llama.cpp's
``llama-server``, TGI, another zerostart). The gateway starts it on a free loopback port,
watches its output for the phases of its start, polls its health route until it answers 200,
measures what its process tree holds, and stops the whole process group.

Parking, where the engine and the device allow it:

- the engine's own route (vLLM's sleep mode, SGLang's memory release), on CUDA: subclasses;
- the CUDA driver's checkpoint API for any process (``zerostart.snapshot.suspend``/``resume``):
  its device memory is copied to host memory and freed, the process and its context stay.

On CPU there is nothing to release that a stop would not release too: foreign replicas stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import httpx

from zerostart import snapshot
from zerostart.names import Climb, Rung
from zerostart.serve.edge import StartFailed
from zerostart.serve.backends import _measure
from zerostart.serve.backends._base import ColdStart, Memory, WorkerBackend, WorkerError
from zerostart.serve.backends._log_phases import Detail, LogPhases, Marker
from zerostart.serve.backends._process import Moment
from zerostart.serve.control import ParkResult, Refusal
from zerostart.telemetry import Timeline

if TYPE_CHECKING:
    from zerostart.serve._config import ModelConfig, ServerConfig

log = logging.getLogger("zerostart.serve")

_HEALTH_POLL_S = 0.25  # between health checks while it starts
_HEALTH_TIMEOUT_S = 5.0  # one health check (a server that accepted but does not answer yet)


class ForeignWorker(WorkerBackend):
    """A server that binds its own port and speaks OpenAI. Subclasses say how to start it
    (:meth:`argv`), where its health route is, and which log lines mark its phases."""

    health_path: str = "/health"  # (the command backend sets its own per instance)
    markers: ClassVar[Sequence[Marker]] = ()  # log lines that end each start phase
    details: ClassVar[Sequence[Detail]] = ()
    last_phase: ClassVar[str] = "start"  # the phase from the last marker (or the spawn) to ready
    engine: str = "the server"  # for messages
    model: ModelConfig  # always set: a foreign engine has no standby worker (asserted below)

    def __init__(self, model: ModelConfig | None, server: ServerConfig, socket_dir: str) -> None:
        super().__init__(model, server, socket_dir)
        assert model is not None, "foreign engines have no standby worker"
        self._phases: LogPhases | None = None
        self._hot_bytes: int | None = None  # device bytes measured when it first became ready
        self._checkpointed: list[int] = []  # pids suspended with the CUDA checkpoint API
        self.parkable = False  # started so that it can be parked (the fleet decides)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.process.label}#{self.id} pid={self.pid}>"

    # -- what subclasses say ----------------------------------------------------------------

    def argv(self, host: str, port: int) -> list[str]:
        """The engine's command line, listening on ``host:port``."""
        raise NotImplementedError

    def engine_env(self) -> dict[str, str]:
        """The child's environment: the gateway's and the model's ``env``."""
        return self.child_env()

    @classmethod
    def parking(cls, model: ModelConfig) -> Refusal | None:
        if model.device.startswith("cuda"):
            return None  # the CUDA checkpoint API parks any process (a worker may still refuse)
        return Refusal(code="not_parkable", message=f"{cls.engine} on {model.device} cannot park: there is no "
                       "device memory to release that stopping it would not release (parking foreign engines "
                       "needs CUDA: their own sleep route or the CUDA checkpoint API); it stops instead")

    @classmethod
    def missing_rungs(cls, model: ModelConfig) -> dict[Rung, str]:
        """The rungs of the ladder this backend cannot rest ``model`` on, with why."""
        out = {Rung.IMAGE: f"{cls.engine} keeps no ready image of its own: a stopped replica starts again from "
                           f"its checkpoint"}
        refusal = cls.parking(model)
        if refusal is not None:
            out[Rung.PARKED] = refusal.message
        return out

    # -- climbing ---------------------------------------------------------------------------

    async def start(self, *, parkable: bool) -> ColdStart:
        self.parkable = parkable
        phases = LogPhases(self.markers, self.last_phase, origin=time.perf_counter(), details=self.details)
        self._phases = phases
        self.process.on_line = phases.feed
        spawned = await self.process.launch(self.argv, self.engine_env())
        phases.origin = spawned.perf
        log.info("model %s: starting %s, pid %d (%s)", self.process.label, self.engine, self.pid, self.address)
        ready = await self._await_healthy()
        tl = phases.timeline(ready.perf, label=f"{self.process.label} cold start")
        return ColdStart(timeline=tl, climb=Climb.SOURCE)

    async def _await_healthy(self) -> Moment:
        poll = asyncio.create_task(self._poll_health())
        exited = asyncio.create_task(self.exited.wait())
        try:
            await asyncio.wait({poll, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not poll.done():
                poll.cancel()
        if not poll.done() or poll.cancelled() or poll.exception() is not None:
            raise StartFailed(self.process.exit_message(f"while starting (phase {self._phase()})"), cause="exit")
        return poll.result()

    async def _poll_health(self) -> Moment:
        client = self.process.client
        assert client is not None
        while True:
            try:
                r = await client.get(self.health_path, timeout=_HEALTH_TIMEOUT_S)
                if r.status_code == 200:
                    return Moment.now()
            except httpx.HTTPError:  # not listening yet, or listening and still loading
                pass
            await asyncio.sleep(_HEALTH_POLL_S)

    def _phase(self) -> str:
        return self._phases.current if self._phases is not None else "spawn"

    async def current_phase(self) -> str:
        return self._phase()

    # -- memory -----------------------------------------------------------------------------

    async def measure_memory(self) -> Memory | None:
        """What its process tree holds now: CUDA memory on its GPU (nvidia-smi), or on CPU the
        summed proportional set size of its processes. Parked on CUDA it holds nothing there."""
        if self.pid is None:
            return None
        held = await asyncio.to_thread(self._held_now)
        if held is None:
            return None
        if self._hot_bytes is None:
            self._hot_bytes = held
        on_cpu = self.model.device == "cpu"
        return Memory(held_bytes=held, parked_bytes=held if on_cpu else 0)

    def _held_now(self) -> int | None:
        assert self.pid is not None and self.model is not None
        tree = _measure.process_tree(self.pid)
        if self.model.device == "cpu":
            return _measure.host_bytes(tree) or None
        return _measure.device_bytes(tree, self.model.device)

    # -- parking: the CUDA checkpoint API (subclasses with a sleep route override) ----------

    async def park(self, timeout: float) -> ParkResult | Refusal:
        refusal = self.parking(self.model)
        if refusal is not None:
            return refusal
        return await self._checkpoint_park(timeout)

    async def wake(self, timeout: float) -> ColdStart:
        return await self._checkpoint_wake(timeout)

    async def _checkpoint_park(self, timeout: float) -> ParkResult | Refusal:
        """Lock and checkpoint every process of its tree that holds a CUDA context: their
        device memory goes to host memory and is freed on the GPU."""
        assert self.pid is not None and self.model is not None
        t0 = time.perf_counter()
        tree = await asyncio.to_thread(_measure.process_tree, self.pid)
        pids = await asyncio.to_thread(_measure.cuda_pids, tree, self.model.device)
        if not pids:
            return Refusal(code="not_parkable", message=f"no process of {self.engine} (pid {self.pid}) holds a CUDA "
                                                        f"context on {self.model.device}")
        before = await asyncio.to_thread(_measure.device_bytes, tree, self.model.device)
        done: list[int] = []
        try:
            for pid in pids:
                await asyncio.wait_for(asyncio.to_thread(snapshot.suspend, pid), timeout)
                done.append(pid)
        except snapshot.CheckpointUnavailable as e:
            for pid in reversed(done):  # put back what was suspended: nothing changed
                await asyncio.to_thread(snapshot.resume, pid)
            return Refusal(code="not_parkable", message=str(e))
        except (TimeoutError, OSError) as e:
            raise WorkerError(f"checkpointing {self.engine} (pid {self.pid}) failed: {e!r}") from None
        self._checkpointed = done
        return ParkResult(changed=True, park_s=time.perf_counter() - t0, bytes=before)

    async def _checkpoint_wake(self, timeout: float) -> ColdStart:
        begin = Moment.now()
        try:
            for pid in self._checkpointed:
                await asyncio.wait_for(asyncio.to_thread(snapshot.resume, pid), timeout)
        except (snapshot.CheckpointUnavailable, TimeoutError, OSError) as e:
            raise WorkerError(f"restoring {self.engine} (pid {self.pid}) from its CUDA checkpoint failed: {e}") from None
        self._checkpointed = []
        return self._wake_cold_start(begin, how="cuda checkpoint restore")

    def _wake_cold_start(self, begin: Moment, **detail: Any) -> ColdStart:
        tl = Timeline(origin=begin.perf, label=f"{self.process.label} cold start")
        tl.add("wake", begin.perf, time.perf_counter(), **detail)
        return ColdStart(timeline=tl, climb=Climb.PARKED)
