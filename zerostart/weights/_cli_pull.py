"""``zerostart pull SOURCE``: prefetch a remote checkpoint into the local cache."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from zerostart.units import parse_size
from zerostart.weights._pull import pull


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="hf://org/name[@revision], s3://bucket/prefix or https://host/path of a Hugging Face style model")
    p.add_argument("--concurrency", type=int, default=16, help="parallel ranged requests (default 16)")
    p.add_argument("--part-size", default="16MB", help="bytes per ranged request (default 16MB)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="pull", file=sys.stderr)
        bar.update(done - bar.n)

    path = pull(args.source, concurrency=args.concurrency, part_bytes=parse_size(args.part_size), progress=progress)
    if bar is not None:
        bar.close()
    print(path)
    return 0
