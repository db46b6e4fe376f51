"""``zerostart prefetch --config FILE``: fetch every remote model of a config into this node's
cache, so that no cold start on this node waits for the network (the Kubernetes prefetch
DaemonSet runs it on every node). Local paths and ``hf://`` (the local Hugging Face cache) are
left as they are."""

from __future__ import annotations

import argparse
import sys

from zerostart.serve import load_config
from zerostart.weights import is_remote, pull


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the zerostart config whose models to fetch")
    parser.add_argument("--concurrency", type=int, default=16, help="parallel ranged requests per model (default 16)")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    remote = [m for m in config.models if is_remote(m.path)]
    for m in config.models:
        if not is_remote(m.path):
            print(f"zerostart: {m.served_name}: {m.path} is not a remote source; nothing to fetch", file=sys.stderr)
    for m in remote:
        path = pull(m.path, concurrency=args.concurrency)
        print(f"zerostart: {m.served_name}: {m.path} -> {path}", file=sys.stderr, flush=True)
    return 0
