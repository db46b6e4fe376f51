"""zerostart on a Ray Serve cluster: the single-node fleet inside each engine replica, Ray
around it (docs/design.md §3, docs/cluster.md).

    zerostart serve --cluster ray [--address auto] --config config.yaml

or from Python::

    from zerostart.cluster import deploy
    url = deploy(load_config("config.yaml"))   # joins (or starts) Ray, runs the application

Ray is imported only when a cluster is used; ``ReplicaPolicy`` (the autoscaling adapter) needs
only ``zerostart.policy``.
"""

import importlib
from typing import Any

_EXPORTS = {
    "ReplicaPolicy": "zerostart.cluster._autoscale",
    "build": "zerostart.cluster._app",
    "app_from_args": "zerostart.cluster._app",
    "engine_options": "zerostart.cluster._app",
    "pools": "zerostart.cluster._app",
    "replica_policy": "zerostart.cluster._app",
    "deploy": "zerostart.cluster._run",
    "serve_forever": "zerostart.cluster._run",
    "merge_metrics": "zerostart.cluster._directory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zerostart.cluster' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
