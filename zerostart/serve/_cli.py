"""``zerostart serve``: run the OpenAI-compatible gateway.

    zerostart serve                                  # the built-in demo model
    zerostart serve --model ~/models/llama-3.2-1b    # one checkpoint, named after its directory
    zerostart serve --model s3://bucket/qwen2.5-0.5b # a source: fetched (and cached) on its first start
    zerostart serve --config config.yaml             # everything else (see examples/config.yaml)
    zerostart serve --cluster ray --config ...       # the same models on a Ray Serve cluster (docs/cluster.md)

Command-line options override the config file. A config whose ``cluster.backend`` is set is not
served here: the command line hands it to ``zerostart.cluster`` (which sits above serve).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import Any

from zerostart.serve._config import ConfigError, ServeConfig, load_config
from zerostart.serve._demo import DEMO_NAME, ensure_demo_model
from zerostart.units import format_duration, parse_duration


class ServeStartupError(RuntimeError):
    """The gateway could not start listening."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (models, server, device memory budgets)")
    parser.add_argument("--model", metavar="PATH", action="append", default=[],
                        help="serve this checkpoint directory, .safetensors file, ready image, or source "
                             "(hf://org/name, s3://bucket/prefix, https://...); repeatable, added to the "
                             "config's models. Without any model: the built-in demo model")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000; 0: any free port)")
    parser.add_argument("--allow-unauthenticated", action="store_true", default=None,
                        help="listen on an address other machines can reach without server.api_keys "
                             "(refused otherwise: anyone who reaches it could use every model)")
    parser.add_argument("--idle-timeout", metavar="SECONDS",
                        help="scale every model to zero after this long idle ('300', '5m'; negative: never)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="gateway log level (debug also shows worker output and each request)")
    parser.add_argument("--cluster", choices=["ray"], help="serve on a Ray Serve cluster instead of this machine "
                                                            "(cluster.backend; docs/cluster.md)")
    parser.add_argument("--address", help="the Ray cluster to join: auto ($RAY_ADDRESS, else a running local "
                                          "cluster, else a new one) or host:port (cluster.address)")


def build_config(args: argparse.Namespace) -> tuple[ServeConfig, bool]:
    """The config file with the command line's overrides; True when serving the demo model."""
    config = load_config(args.config) if args.config else ServeConfig()
    data = config.model_dump()
    server = data["server"]
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    if args.allow_unauthenticated:
        server["allow_unauthenticated"] = True
    if args.log_level is not None:
        server["log_level"] = args.log_level
    if getattr(args, "cluster", None) is not None:
        data["cluster"]["backend"] = args.cluster
    if getattr(args, "address", None) is not None:
        data["cluster"]["address"] = args.address
    for path in args.model:
        data["models"].append({"path": path})
    demo = not data["models"]
    if demo:
        print(f"zerostart: no model given: serving the built-in demo model {DEMO_NAME!r} (SmolLM2-135M-Instruct); "
              "pass --model PATH or --config FILE to serve your own.", file=sys.stderr)
        data["models"].append({"path": ensure_demo_model(), "name": DEMO_NAME})
    if args.idle_timeout is not None:
        try:
            idle = parse_duration(args.idle_timeout, forever_if_negative=True)
        except ValueError as e:
            raise ConfigError(f"--idle-timeout: {e}") from None
        for m in data["models"]:
            m["idle_timeout"] = idle
    return load_config(data=data), demo


def main(args: argparse.Namespace) -> int:
    """Serve the config the command line builds on this machine (``zerostart serve`` sends one
    with a cluster backend to that cluster instead: ``cli.py``)."""
    config, _ = build_config(args)
    if config.cluster.backend is not None:
        raise ConfigError(f"cluster.backend is {config.cluster.backend}: run it with `zerostart serve`, which hands "
                          "it to zerostart.cluster")
    return serve(config)


def serve(config: ServeConfig) -> int:
    """Run the gateway for ``config`` until SIGTERM or ^C."""
    # the gateway and its server (seconds of imports) only when one runs: the parser and --help need neither
    import uvicorn

    from zerostart.serve.edge import bounded_protocol
    from zerostart.serve.gateway import create_app

    server = config.server
    logging.basicConfig(level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if server.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request otherwise
    app = create_app(config)  # checks every model's checkpoint and memory estimate
    sock = _listen(server.host, server.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    names = ", ".join(f"{m.served_name} (idle timeout {format_duration(m.idle_timeout)})" for m in config.models)
    print(f"zerostart: serving on {url}/v1 — models: {names}", file=sys.stderr, flush=True)
    if server.api_keys or server.tenants:
        print("zerostart: API keys required (Authorization: Bearer <key>)", file=sys.stderr, flush=True)
    protocol = bounded_protocol(max_connections=server.max_connections, header_timeout=server.header_timeout)
    # uvicorn's own grace outlasts the fleet's: requests still running at shutdown_timeout are
    # ended by the fleet (a 503, or an SSE error event and [DONE]) and get this long to be sent.
    # (uvicorn annotates an int; it hands the value to asyncio.wait_for, which takes seconds as a float)
    uv = uvicorn.Config(app, log_config=None, log_level=server.log_level, access_log=server.log_level == "debug",
                        lifespan="on", timeout_graceful_shutdown=server.shutdown_timeout + _CLOSING_GRACE_S,  # type: ignore[arg-type]
                        http=protocol)
    _server(uv, app.state.fleet).run(sockets=[sock])
    return 0


_CLOSING_GRACE_S = 2.0


def _server(config: Any, fleet: Any) -> Any:
    """uvicorn's server, telling the fleet when a shutdown begins (SIGTERM, ^C) before uvicorn
    waits for the connections: the fleet then refuses new requests and ends those in flight on
    time (``Fleet.begin_shutdown``)."""
    # the server (seconds to import) only when a gateway runs
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            fleet.begin_shutdown()
            await super().shutdown(sockets)

    return Server(config)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise ServeStartupError(f"cannot listen on {host}:{port} ({e}); pick another --port or server.port") from None
    return sock
