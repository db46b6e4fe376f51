"""A local multi-node Ray cluster on loopback for the `ray` tests, and a zerostart application
deployed on it from a config. Imported only by `ray`-marked tests (in .venvs/ray)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", "set by tests/cluster/conftest.py before ray loads"

import warnings  # noqa: E402

import httpx  # noqa: E402

with warnings.catch_warnings():  # Ray's own modules still use pydantic v1-style Field extras
    warnings.simplefilter("ignore", DeprecationWarning)
    import ray  # noqa: E402
    from ray import serve  # noqa: E402
    from ray.cluster_utils import Cluster  # noqa: E402

from zerostart.cluster import deploy  # noqa: E402
from zerostart.serve import load_config  # noqa: E402

APP = "zerostart"
HEAD_LABELS = {"zerostart-test/role": "head"}
WORKER_LABELS = {"zerostart-test/role": "worker"}
GPU_LABELS = {"zerostart-test/accel": "fake-gpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head node (ingress, directory, Serve's controller and proxy) and worker nodes that each
    fit one engine replica (1 CPU); one of them has 2 fake GPUs and a label."""

    def __init__(self, tmp_dir: str) -> None:
        # Ray records the cluster's address in /tmp/ray/ray_current_cluster whatever temp_dir says,
        # without making the directory: a fresh machine has none
        os.makedirs("/tmp/ray", exist_ok=True)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "labels": HEAD_LABELS, "temp_dir": tmp_dir})
        self.workers = [self.cluster.add_node(num_cpus=1, labels=WORKER_LABELS) for _ in range(2)]
        self.gpu_node = self.cluster.add_node(num_cpus=1, num_gpus=2, labels={**WORKER_LABELS, **GPU_LABELS})
        ray.init(address=self.cluster.address)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port}, proxy_location="HeadOnly")
        self.url = f"http://127.0.0.1:{self.port}"

    def deploy(self, models: list[dict[str, Any]], pools: list[dict[str, Any]], server: dict[str, Any] | None = None,
               **cluster: Any) -> str:
        """Deploy a zerostart config (replacing the previous application); its /v1 base URL."""
        if APP in serve.status().applications:
            serve.delete(APP)
        config = load_config(data={
            "server": {"port": self.port, **(server or {})},
            "models": models,
            "cluster": {"ingress": {"node_labels": HEAD_LABELS}, "pools": pools, **cluster}})
        return deploy(config)

    def replica_states(self, pool: str) -> dict[str, int]:
        app = serve.status().applications.get(APP)
        if app is None or pool not in app.deployments:
            return {}
        return {str(k): v for k, v in app.deployments[pool].replica_states.items()}

    def running(self, pool: str) -> int:
        return self.replica_states(pool).get("RUNNING", 0)

    def status(self) -> dict[str, Any]:
        response = httpx.get(self.url + "/zerostart/status", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def node_of(self, node_id: str) -> Any:
        return next(n for n in self.cluster.list_all_nodes() if n.node_id == node_id)

    def close(self) -> None:
        if APP in serve.status().applications:
            serve.delete(APP)
        serve.shutdown()
        ray.shutdown()
        self.cluster.shutdown()


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
