"""``zerostart serve``, on this machine or on a Ray cluster.

    zerostart serve --config config.yaml                           # this machine (zerostart.serve)
    zerostart serve --cluster ray --config config.yaml             # a Ray cluster: $RAY_ADDRESS, a running one, or new
    zerostart serve --cluster ray --address 10.0.0.5:6379 ...      # that cluster

``--cluster`` and ``--address`` override the config's ``cluster.backend`` and ``cluster.address``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from zerostart.serve import cli as serve_cli
from zerostart.serve import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    serve_cli.add_arguments(parser)
    parser.add_argument("--cluster", choices=["ray"], help="serve on a Ray Serve cluster instead of this machine "
                                                            "(docs/cluster.md)")
    parser.add_argument("--address", help="the Ray cluster to join: auto ($RAY_ADDRESS, else a running local "
                                          "cluster, else a new one) or host:port (default: cluster.address)")


def main(args: argparse.Namespace) -> int:
    config, _ = serve_cli.build_config(args)
    data = config.model_dump()
    if args.cluster is not None:
        data["cluster"]["backend"] = args.cluster
    if args.address is not None:
        data["cluster"]["address"] = args.address
    config = load_config(data=data)
    if config.cluster.backend is None:
        return serve_cli.main(args)
    logging.basicConfig(level=config.server.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from zerostart.cluster._run import serve_forever
    except ImportError as e:
        print(f"zerostart: error: --cluster ray needs Ray Serve ({e}); install it with "
              "pip install 'ray[serve]' (or make ray-env)", file=sys.stderr)
        return 1
    return serve_forever(config)
