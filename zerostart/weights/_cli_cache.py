"""``zerostart cache ls|rm|gc``: the local cache of remote checkpoints."""

from __future__ import annotations

import argparse
import time

from zerostart.units import parse_size
from zerostart.weights._cache import Cache


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("ls", help="list cached sources")
    rm = sub.add_parser("rm", help="remove a cached source")
    rm.add_argument("source")
    gc = sub.add_parser("gc", help="evict least recently used objects down to the size cap")
    gc.add_argument("--max-size", help="evict down to this size instead (e.g. 50GB)")


def main(args: argparse.Namespace) -> int:
    cache = Cache()
    if args.action == "ls":
        entries = cache.entries()
        print(f"cache: {cache.root} ({cache.total_bytes() / 1e9:.2f} GB of {cache.max_bytes / 1e9:.0f} GB cap)")
        if not entries:
            print("(empty)")
        for e in entries:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "-"
            state = "complete" if e.complete else "partial"
            print(f"{e.bytes / 1e9:9.2f} GB  {e.files:4d} files  {state:<8}  last used {used}  {e.source}")
        return 0
    if args.action == "rm":
        freed = cache.remove(args.source)
        print(f"removed {args.source} ({freed / 1e9:.2f} GB freed)")
        return 0

    cap = parse_size(args.max_size) if args.max_size else None
    freed = cache.gc(cap)
    print(f"freed {freed / 1e9:.2f} GB; cache now {cache.total_bytes() / 1e9:.2f} GB")
    return 0
