"""``zerostart serve`` on a Ray cluster (``--cluster ray``, or ``cluster.backend: ray`` in the
config): the command line builds the config as for one machine (``serve/_cli.py``) and hands it
here, above serve, where the fleet runs inside Ray's replicas (docs/cluster.md)."""

from __future__ import annotations

import logging
import sys

from zerostart.cluster._run import serve_forever
from zerostart.serve import ServeConfig


class RayUnavailable(RuntimeError):
    """Ray Serve is not installed in this environment."""


def main(config: ServeConfig) -> int:
    """Deploy ``config`` on its cluster and keep it until interrupted."""
    logging.basicConfig(level=config.server.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve_forever(config)
    except ImportError as e:  # ray, imported when the cluster is joined
        raise RayUnavailable(f"--cluster {config.cluster.backend} needs Ray Serve ({e}); install it with "
                             "pip install 'ray[serve]' (or make ray-env)") from None
