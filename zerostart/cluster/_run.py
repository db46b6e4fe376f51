"""Joining (or starting) a Ray cluster and running the application on it."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from zerostart.cluster._app import build
from zerostart.serve import ServeConfig

log = logging.getLogger("zerostart.cluster")


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``auto``: $RAY_ADDRESS or a running local cluster, else
    start a local one)."""
    # ray (optional): only when a cluster is joined
    import ray

    if ray.is_initialized():
        return
    if address != "auto":
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        log.info("no running Ray cluster found: starting a local one")
        ray.init()


def deploy(config: ServeConfig, *, address: str | None = None) -> str:
    """Deploy ``config`` on the cluster; returns the OpenAI base URL of Ray Serve's proxy."""
    # ray (optional): only when a cluster is joined
    from ray import serve

    connect(address or config.cluster.address)
    server = config.server
    serve.start(http_options={"host": server.host, "port": server.port}, proxy_location=config.cluster.proxy_location)
    serve.run(build(config), name=config.cluster.app_name, route_prefix="/", blocking=False)
    host = server.host if ":" not in server.host else f"[{server.host}]"
    return f"http://{host}:{server.port}/v1"


def serve_forever(config: ServeConfig, *, address: str | None = None) -> int:
    """``zerostart serve --cluster ray``: deploy, then keep the application until interrupted."""
    # ray (optional): only when a cluster is joined
    from ray import serve

    url = deploy(config, address=address)
    names = ", ".join(m.served_name for m in config.models)
    print(f"zerostart: serving on Ray at {url} — models: {names}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(config.cluster.app_name)
    return 0


def status_of(app_name: str) -> dict[str, Any]:
    """Ray's own view of the application's deployments (replica states per deployment)."""
    # ray (optional): only when a cluster is joined
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: {"status": str(d.status.value), "replica_states": dict(d.replica_states)}
            for name, d in app.deployments.items()}
