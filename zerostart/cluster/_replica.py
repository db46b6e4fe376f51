"""The engine replica: one Ray Serve replica holding a pool's models, each on its own rung.

Inside, it is zerostart's single-node gateway (``zerostart.serve.create_app`` over a ``Fleet``
of the pool's models), called in-process: the fleet does single-flight starts per model,
bounded holding, parking and waking, ready images on the node's local cache, and per-model
keep-alive policies, exactly as on one machine. What Ray adds is around it: which replica a
request lands on (``serve.multiplexed``: a replica that already holds the model), how many
replicas exist (``ReplicaPolicy``), and where they run (placement).

A request arrives as ``generate(path, body, headers)`` with its model as the multiplexed model
id, and streams back a :class:`~zerostart.cluster._asgi.Head` then the body's bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator

import ray
from ray import serve

from zerostart.cluster._asgi import Head, call
from zerostart.serve import Fleet, create_app, load_config

log = logging.getLogger("zerostart.cluster")


class EngineReplica:
    """The deployment class (``serve.deployment`` is applied by ``_app.build``)."""

    # Ray Serve awaits an async constructor; Python's data model does not know that kind
    async def __init__(self, config: dict[str, Any], pool: str, models: list[str], directory: Any) -> None:  # type: ignore[misc]
        self.started_at = time.time()  # wall clock: comparable with the ingress's and the client's
        began = time.monotonic()
        full = load_config(data=config)
        # the fleet of this replica: the pool's models, with the server's settings
        data = full.model_dump()
        data["models"] = [m.model_dump() for m in full.models if m.served_name in models]
        data["cluster"] = {}
        self.config = load_config(data=data)
        # cluster.cache_dir reaches this process (and its workers) as ZEROSTART_CACHE_DIR, through
        # the deployment's runtime_env: every replica on a node shares its ready images and weights
        self.pool = pool
        self.directory = directory
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        runtime = ray.get_runtime_context()
        self.node_id = runtime.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.fleet = Fleet(self.config)
        self.app = create_app(self.config, self.fleet)
        await self.fleet.start()
        self.init_s = time.monotonic() - began  # this replica's own start, once Ray started its process
        self._interval = full.cluster.status_interval
        self._changed = asyncio.Event()  # a request ended: report now rather than at the next interval
        self._reporter = asyncio.create_task(self._report_loop())
        log.info("replica %s of pool %s on node %s: models %s", self.replica_id, pool, self.node_id[:12],
                 ", ".join(self.fleet.names()))

    async def __del__(self) -> None:
        self._reporter.cancel()
        await self.fleet.close()
        try:
            await self.directory.forget.remote(self.replica_id)
        except Exception as e:  # the directory may be gone with the app; nothing to forget then
            log.debug("replica %s: could not leave the directory (%s)", self.replica_id, e)

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> AsyncIterator[Head | bytes]:
        """One OpenAI request for the multiplexed model id: the gateway app's response as written."""
        model = serve.get_multiplexed_model_id()
        if model:
            await self._register(model)
        try:
            async for part in call("POST", path, body, headers, app=self.app):
                if isinstance(part, Head):
                    part = Head(part.status, part.headers + [("x-zerostart-replica", self.replica_id),
                                                             ("x-zerostart-node", self.node_id[:12])])
                yield part
        finally:
            self._changed.set()

    @serve.multiplexed(max_num_models_per_replica=-1)
    async def _register(self, model: str) -> str:
        """Ray's multiplexed "load": it only registers the model on this replica, so that Ray
        routes the model's next requests here. The fleet climbs the model on the request itself
        (a cold start, single-flight per model), so Ray's model-cache lock, which serializes
        loads across models, is never held for a load. No limit on models per replica: the
        fleet's memory budgets decide what stays hot, parked or goes to its image."""
        return model

    # -- status -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """What this replica holds, for the cluster's status and metrics."""
        return {"replica": self.replica_id, "pool": self.pool, "node": self.node_id, "node_ip": self.node_ip,
                "pid": os.getpid(), "started_at": self.started_at, "init_s": self.init_s, "at": time.time(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "status": self.fleet.status(), "metrics": self.fleet.metrics.render().decode()}

    async def _report_loop(self) -> None:
        while True:
            try:
                await self.directory.report.remote(self.report())
            except Exception as e:  # the directory restarts with the app; keep serving meanwhile
                log.warning("replica %s: status report failed (%s); retrying", self.replica_id, e)
            try:
                await asyncio.wait_for(self._changed.wait(), self._interval)
            except TimeoutError:
                pass
            self._changed.clear()
