"""HTTP in front, replicas behind: the OpenAI-compatible gateway and its workers.

    zerostart serve --config config.yaml

or from Python::

    from zerostart.serve import load_config, create_app
    app = create_app(load_config("config.yaml"))   # an ASGI app; run it with uvicorn

The tree is the two processes and what joins them::

    edge/       the HTTP edge the gateway, the workers and the cluster's ingress share: the
                route table, request bodies, keys and tenants, errors, holding, limits
    gateway/    the gateway process: HTTP app, OpenAI routes, status, metrics, the Responses
                store, and the fleet (held requests, climbing/parking/stopping, memory, idling)
    worker/     zerostart's own worker process: one model's engine + control routes
    backends/   how a replica of each engine is started, probed, parked, woken, stopped
    control.py  the typed gateway <-> worker protocol
    _config.py  the configuration file's schema; _keys.py: errors that name the wrong key
    _cli.py     zerostart serve; _demo.py: the built-in demo model; _lazy.py: these lazy names

The gateway never imports torch; each worker process holds one model. Names are imported on
first use, so that a worker process starts without loading the gateway's modules.
"""

from zerostart.serve._lazy import lazy_face

_EXPORTS = {
    "DEMO_NAME": "zerostart.serve._demo",
    "ensure_demo_model": "zerostart.serve._demo",
    "ClusterConfig": "zerostart.serve._config_cluster",
    "IngressConfig": "zerostart.serve._config_cluster",
    "PlacementConfig": "zerostart.serve._config_cluster",
    "PoolConfig": "zerostart.serve._config_cluster",
    "ConfigError": "zerostart.serve._config",
    "DeviceConfig": "zerostart.serve._config",
    "ModelConfig": "zerostart.serve._config",
    "PrewarmWindow": "zerostart.serve._config",
    "ServeConfig": "zerostart.serve._config",
    "ServerConfig": "zerostart.serve._config",
    "load_config": "zerostart.serve._config",
    "State": "zerostart.serve.gateway",
    "TRANSITIONS": "zerostart.serve.gateway",
    "Fleet": "zerostart.serve.gateway",
    "create_app": "zerostart.serve.gateway",
}

__all__, __getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
