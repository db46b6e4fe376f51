"""The serve config's ``cluster:`` section: the same models on a Ray Serve cluster (pools of
models per engine-replica deployment, their placement, the ingress; docs/cluster.md)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from zerostart.serve._config_base import Seconds, Section


class PlacementConfig(Section):
    """Where one replica of a pool runs on a Ray cluster, and what it reserves there."""

    num_cpus: float = Field(1.0, ge=0)  # CPUs a replica reserves; its models' workers run inside this share
    num_gpus: float = Field(0.0, ge=0)  # GPUs a replica reserves (CUDA_VISIBLE_DEVICES of its workers)
    tensor_parallel: int = Field(1, ge=1)  # >1: one placement-group bundle of num_gpus GPUs per rank, packed on one node
    node_labels: dict[str, str] = {}  # run only on Ray nodes with these labels (e.g. zerostart.io/nvme: "true")
    max_replicas_per_node: int | None = Field(None, ge=1)  # at most this many of the pool's replicas on one node
    resources: dict[str, float] = {}  # custom Ray resources a replica reserves

    @model_validator(mode="after")
    def _tp(self) -> "PlacementConfig":
        if self.tensor_parallel > 1 and self.num_gpus <= 0:
            raise ValueError(f"tensor_parallel is {self.tensor_parallel} but num_gpus is 0: each rank needs GPUs")
        return self


class PoolConfig(Section):
    """Models that share one engine-replica deployment: each replica holds several of them, each on
    its own rung of the ladder, and Ray routes a request to a replica that already holds its model."""

    name: str  # the Ray Serve deployment is named after it
    models: list[str]  # served names of models in `models`
    min_replicas: int = Field(0, ge=0)  # replicas kept whatever the traffic
    max_replicas: int = Field(1, ge=1)  # another replica starts past target_ongoing_requests per replica
    target_ongoing_requests: float = Field(16.0, gt=0)  # per replica, when the pool scales past one replica
    max_ongoing_requests: int = Field(64, ge=1)  # requests Ray sends one replica at once
    max_queued_requests: int = Field(512, ge=1)  # requests Ray holds while no replica has room (at zero too); beyond: 429
    keep_alive_policy: str | None = None  # when the pool's last replica goes (a zerostart.policy spec); None: ttl of the
    #                                      longest idle_timeout among its models (the replica outlives its models' ladder)
    placement: PlacementConfig = PlacementConfig()

    @model_validator(mode="after")
    def _ranges(self) -> "PoolConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if not self.models:
            raise ValueError("a pool needs at least one model")
        return self


class IngressConfig(Section):
    """The OpenAI ingress deployment in front of the pools."""

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    node_labels: dict[str, str] = {}
    max_ongoing_requests: int = Field(4096, ge=1)  # requests one ingress replica holds (streams included)


class ClusterConfig(Section):
    """``zerostart serve --cluster ray``: the same models on a Ray Serve cluster (docs/cluster.md)."""

    backend: Literal["ray"] | None = None  # ray: serve on a Ray cluster; None: this machine only (--cluster sets it)
    address: str = "auto"  # the Ray cluster: auto (RAY_ADDRESS, else a running one, else a new local one), or host:port
    app_name: str = "zerostart"  # the Ray Serve application
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"  # where Ray Serve's HTTP proxies run
    cache_dir: str | None = None  # node-local cache (ready images, fetched weights) on every node; None: each node's
    #                               $ZEROSTART_CACHE_DIR or ~/.cache/zerostart
    status_interval: Seconds = Field(1.0, gt=0)  # how often each replica reports its models' rungs for status/metrics
    metrics_interval: Seconds = Field(0.5, gt=0)  # how often Ray's handles report load to the autoscaler
    look_back: Seconds = Field(1.0, gt=0)  # the window Ray averages that load over
    ingress: IngressConfig = IngressConfig()
    pools: list[PoolConfig] = []  # models in no pool share one pool named "default"

    @model_validator(mode="after")
    def _unique_pools(self) -> "ClusterConfig":
        names = [p.name for p in self.pools]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"two pools are named {n!r}")
            if not re.fullmatch(r"[A-Za-z0-9_-]+", n):
                raise ValueError(f"pool name {n!r}: use letters, digits, '-' and '_'")
        return self
