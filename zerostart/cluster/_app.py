"""A zerostart config as a Ray Serve application, and running it.

    ingress (OpenAI routes) ─► pool "small" (engine replicas, each: a fleet of the pool's models)
                            ─► pool "large" ...
    directory (what every replica holds, for status and metrics)

One engine-replica deployment per pool. Its autoscaling is zerostart's ``ReplicaPolicy`` with
Ray's delays at zero; its placement comes from ``pools[].placement``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from zerostart.serve import PoolConfig, ServeConfig, load_config

log = logging.getLogger("zerostart.cluster")

DEFAULT_POOL = "default"
DIRECTORY = "zerostart-directory"
INGRESS = "zerostart-ingress"
_POLICY_PATH = "zerostart.cluster._autoscale:ReplicaPolicy"


def pools(config: ServeConfig) -> list[PoolConfig]:
    """The configured pools, and the models in none of them as the pool ``default``."""
    out = list(config.cluster.pools)
    pooled = {m for p in out for m in p.models}
    rest = [m.served_name for m in config.models if m.served_name not in pooled]
    if rest:
        if any(p.name == DEFAULT_POOL for p in out):
            raise ValueError(f"models {', '.join(rest)} are in no pool, and a pool is already named {DEFAULT_POOL!r}; "
                             "put them in a pool")
        out.append(PoolConfig(name=DEFAULT_POOL, models=rest))
    return out


def replica_policy(pool: PoolConfig, config: ServeConfig) -> str:
    """The pool's replica-level policy spec: its own, else a ttl of its models' longest idle_timeout
    (the replica stays while any of its models would still be kept, hot or parked)."""
    if pool.keep_alive_policy:
        return pool.keep_alive_policy
    longest = max(config.model(name).idle_timeout for name in pool.models)
    return "always" if math.isinf(longest) else f"ttl:{max(0.0, longest):g}"


def engine_options(pool: PoolConfig, config: ServeConfig) -> dict[str, Any]:
    """``serve.deployment`` options of a pool's engine replicas."""
    c = config.cluster
    place = pool.placement
    actor: dict[str, Any] = {"num_cpus": place.num_cpus, "num_gpus": place.num_gpus * place.tensor_parallel}
    if place.resources:
        actor["resources"] = dict(place.resources)
    if place.node_labels:
        actor["label_selector"] = dict(place.node_labels)
    if c.cache_dir:
        actor["runtime_env"] = {"env_vars": {"ZEROSTART_CACHE_DIR": c.cache_dir}}
    opts: dict[str, Any] = {
        "name": pool.name,
        "ray_actor_options": actor,
        "max_ongoing_requests": pool.max_ongoing_requests,
        "max_queued_requests": pool.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": pool.min_replicas, "initial_replicas": pool.min_replicas,
            "max_replicas": pool.max_replicas, "target_ongoing_requests": pool.target_ongoing_requests,
            # Ray's own delays out of the way: zerostart's policy decides when, Ray applies it at once
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0, "downscale_to_zero_delay_s": 0.0,
            "metrics_interval_s": c.metrics_interval, "look_back_period_s": c.look_back,
            "policy": {"policy_function": _POLICY_PATH,
                       "policy_kwargs": {"policy": replica_policy(pool, config), "pool": pool.name,
                                         "target_ongoing_requests": pool.target_ongoing_requests}},
        },
        # a model's workers get stop_timeout to exit; the fleet closes them in __del__
        "graceful_shutdown_timeout_s": max(config.server.shutdown_timeout,
                                           max(config.model(n).stop_timeout for n in pool.models)) + 5.0,
        "health_check_period_s": 2.0,
    }
    if place.max_replicas_per_node is not None:
        opts["max_replicas_per_node"] = place.max_replicas_per_node
    return opts


def build(config: ServeConfig) -> Any:
    """The Ray Serve application (``serve.run(build(config))``)."""
    # ray (optional), with the deployments: only when a cluster is built
    from ray import serve

    # ray (optional), with the deployments: only when a cluster is built
    from zerostart.cluster._directory import Directory
    from zerostart.cluster._ingress import Ingress
    from zerostart.cluster._replica import EngineReplica

    data = config.model_dump()  # plain values (inf stays a float): Ray pickles them to every replica
    directory = serve.deployment(Directory, name=DIRECTORY, num_replicas=1,
                                 ray_actor_options={"num_cpus": 0}).bind(config.cluster.status_interval)
    groups = pools(config)
    engines = [serve.deployment(EngineReplica, **engine_options(p, config)).bind(data, p.name, p.models, directory)
               for p in groups]
    ing = config.cluster.ingress
    actor: dict[str, Any] = {"num_cpus": ing.num_cpus}
    if ing.node_labels:
        actor["label_selector"] = dict(ing.node_labels)
    return serve.deployment(Ingress, name=INGRESS, num_replicas=ing.replicas, ray_actor_options=actor,
                            max_ongoing_requests=ing.max_ongoing_requests).bind(
        data, {p.name: p.models for p in groups}, engines, directory)


def app_from_args(args: dict[str, Any]) -> Any:
    """An application builder for Ray Serve config files and KubeRay's ``serveConfigV2``::

        import_path: zerostart.cluster:app_from_args
        args: {config: /etc/zerostart/config.yaml}
    """
    path = args.get("config") or os.environ.get("ZEROSTART_CONFIG")
    if not path:
        raise ValueError("zerostart.cluster:app_from_args needs args.config (a zerostart config file) or "
                         "$ZEROSTART_CONFIG")
    return build(load_config(path))
