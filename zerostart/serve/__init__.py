"""HTTP in front, replicas behind: the OpenAI-compatible gateway and its workers.

    zerostart serve --config config.yaml

or from Python::

    from zerostart.serve import load_config, create_app
    app = create_app(load_config("config.yaml"))   # an ASGI app; run it with uvicorn

The tree is the two processes and what joins them::

    gateway/    the gateway process: HTTP app, OpenAI routes, auth, status, metrics, and the
                fleet (held requests, climbing/parking/stopping, memory, the idle ticker)
    worker/     zerostart's own worker process: one model's engine + control routes
    backends/   how a replica of each engine is started, probed, parked, woken, stopped
    control.py  the typed gateway <-> worker protocol
    _config.py  the configuration file's schema; _keys.py: errors that name the wrong key
    _http.py, _connections.py, _errors.py, _openai_schema.py: the HTTP edge both sides share
    _cli.py     zerostart serve; _demo.py: the built-in demo model; _lazy.py: these lazy names

The gateway never imports torch; each worker process holds one model. Names are imported on
first use, so that a worker process starts without loading the gateway's modules.
"""

from zerostart.serve._lazy import lazy_face

_EXPORTS = {
    "DEMO_NAME": "zerostart.serve._demo",
    "ensure_demo_model": "zerostart.serve._demo",
    "ClusterConfig": "zerostart.serve._config",
    "IngressConfig": "zerostart.serve._config",
    "PlacementConfig": "zerostart.serve._config",
    "PoolConfig": "zerostart.serve._config",
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
    # what zerostart.cluster builds on: the API's request schema, its errors, the cold-start header
    "COLD_START_HEADER": "zerostart.serve.gateway",
    "ServeError": "zerostart.serve._errors",
    "BadRequest": "zerostart.serve._errors",
    "UnknownModel": "zerostart.serve._errors",
    "QueueFull": "zerostart.serve._errors",
    "WorkerFailed": "zerostart.serve._errors",
    "ROUTES": "zerostart.serve._openai_schema",
    "parse_request": "zerostart.serve._openai_schema",
}

__all__, __getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
