"""The standby worker (docs/design.md §2): one spare worker process that has imported torch and the
engine and initialized its device, waiting to be told which model to become. A cold start
takes it (no spawn, import or device init on its path) and a new spare is prepared once that
start is over and the requests that waited for it are served, so the spare's imports do not
compete with them for the machine. Its memory is not counted against any model's budget.

With ``server.standby_reserve`` a CPU spare also faults in that much host memory while it waits
(``weights.reserve_host``): the model it is handed is read into memory already in place, so the
read runs at the disk's speed even where touching new memory is slower than the disk.

Lifecycle of the spare::

    none     -> preparing   ``standby_workers: 1`` and no spare (at start; after a hand-over, once
                            the requests that waited for it are served; after the spare died;
                            after a failure, retried with back-off)
    preparing -> ready      the worker reports ``standby``
    preparing -> none       it did not come up (logged; retried after 5 s, doubling to 300 s)
    ready    -> taken       a cold start of a model of the zerostart backend on the same device
                            without extra ``env`` (a running process cannot take a model's environment)
    ready    -> none        it exited unasked
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from zerostart.serve._config import ModelConfig, ServerConfig
from zerostart.serve.edge import StartFailed
from zerostart.serve.backends import ZerostartWorker

log = logging.getLogger("zerostart.serve")

_BACKOFF_S = (5.0, 300.0)  # first retry after a failed spare, and the most it waits


class Standby:
    def __init__(self, server: ServerConfig, device: str, timeout: float, estimates: Sequence[int] = ()) -> None:
        self._server = server
        self.device = device  # the device the spare initializes (the one most models use)
        self._timeout = timeout  # how long a spare may take to come up
        self._socket_dir: str | None = None
        self._spare: ZerostartWorker | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._closing = False
        self.reserve = self._reserve_bytes(estimates)  # host memory a spare faults in for the arena

    def _reserve_bytes(self, estimates: Sequence[int]) -> int:
        """``server.standby_reserve`` resolved: bytes, or for ``auto`` the largest memory estimate
        among the models on the spare's device; 0 without a spare or on a device other than cpu."""
        setting = self._server.standby_reserve
        if not self.enabled or not setting:
            return 0
        if self.device != "cpu":
            log.warning("server.standby_reserve: the standby worker initializes %s, and a host memory reserve serves "
                        "CPU arenas only; none is made", self.device)
            return 0
        if setting != "auto":
            return int(setting)
        if not estimates:
            log.warning("server.standby_reserve is auto, but no model on cpu has a memory estimate; no reserve")
        return max(estimates, default=0)

    @property
    def enabled(self) -> bool:
        return self._server.standby_workers > 0

    def start(self, socket_dir: str) -> None:
        self._socket_dir = socket_dir
        self.ensure()

    def ensure(self) -> None:
        """Prepare a spare if there should be one and none is ready or on its way."""
        if not self.enabled or self._closing or self._spare is not None or self._task is not None:
            return
        self._task = asyncio.create_task(self._prepare())

    async def _prepare(self) -> None:
        assert self._socket_dir is not None, "Standby.start() was not called"
        if self._failures:
            lo, hi = _BACKOFF_S
            await asyncio.sleep(min(lo * 2 ** (self._failures - 1), hi))
        r = ZerostartWorker(None, self._server, self._socket_dir, standby_device=self.device,
                            standby_reserve=self.reserve)
        r.on_exit = lambda: self._on_exit(r)
        try:
            async with asyncio.timeout(self._timeout):
                await r.start_standby()
        except (StartFailed, TimeoutError) as e:
            self._failures += 1
            log.error("the standby worker on %s did not come up (%s); retrying", self.device,
                      e.message if isinstance(e, StartFailed) else f"not ready within {self._timeout:g} s")
            await r.kill()
            self._task = None
            self.ensure()
            return
        except asyncio.CancelledError:
            await r.kill()
            raise
        self._failures = 0
        self._spare, self._task = r, None
        log.info("standby worker pid %s is ready on %s", r.pid, self.device)

    def take(self, model: ModelConfig) -> ZerostartWorker | None:
        """The ready spare, for ``model`` (its :meth:`ZerostartWorker.hand_over` loads it); None
        if there is none or the model cannot use it (another backend, another device, or extra
        ``env``). The caller sets its ``on_exit``. Call :meth:`ensure` once its load is over."""
        r = self._spare
        if (r is None or r.exited.is_set() or model.backend != ZerostartWorker.name or model.env
                or model.device != self.device):
            return None
        self._spare = None
        r.assign(model)
        log.info("model %s: handing the model to standby worker pid %s", model.served_name, r.pid)
        return r

    def _on_exit(self, r: ZerostartWorker) -> None:
        if self._spare is r:
            log.warning("the standby worker pid %s exited unasked; preparing another", r.pid)
            self._spare = None
            self._failures += 1
            asyncio.get_running_loop().create_task(r.process.close())
            self.ensure()

    async def close(self, timeout: float) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._spare is not None:
            spare, self._spare = self._spare, None
            await spare.stop(timeout)

    @property
    def ready(self) -> int:
        return int(self._spare is not None)

    def status(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        r = self._spare
        state = "ready" if r is not None else "preparing" if self._task is not None else "none"
        return {"state": state, "device": self.device, "pid": r.pid if r is not None else None,
                "reserve_bytes": self.reserve}
