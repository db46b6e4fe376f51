"""``zerostart demo-model``: write a random-weights demo checkpoint (Hugging Face layout)."""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from zerostart.engine.demo import SIZES

    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (created)")
    parser.add_argument("--size", choices=list(SIZES), default="small",
                        help="tiny (tests, <1 MB), small (~30M parameters, quick on CPU), "
                             "1b (~1B parameters, ~2 GB bfloat16, sharded) (default: small)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it holds something else")
    parser.epilog = "The weights are random: the model's output is gibberish. It exists to try zerostart offline."


def main(args: argparse.Namespace) -> int:
    from zerostart.engine.demo import GIBBERISH_NOTE, write_demo_model

    t0 = time.perf_counter()
    path = write_demo_model(args.out, size=args.size, seed=args.seed, overwrite=args.force)
    print(path)
    print(f"zerostart: wrote the {args.size} demo model in {time.perf_counter() - t0:.1f} s; {GIBBERISH_NOTE}",
          file=sys.stderr)
    return 0
