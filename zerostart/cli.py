"""The ``zerostart`` command line.

Thin by design: each command lives next to the code it drives, in a module exposing
``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported by name (the table
below) only when their command runs, so ``zerostart serve`` (the gateway) never imports torch.
The command line sits above every package, so it is also where ``zerostart serve`` on a cluster
goes up to ``zerostart.cluster``, which serve itself never imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

from zerostart import __version__

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("serve",): ("zerostart.serve._cli", "run the OpenAI-compatible gateway (scale-to-zero replicas), "
                                         "on this machine or a Ray cluster"),
    ("status",): ("zerostart.serve._cli_status", "show a running gateway's models: rung, memory, requests, "
                                                 "last cold start"),
    ("generate",): ("zerostart.engine._cli_generate", "generate text from a model on the command line"),
    ("demo-model",): ("zerostart.engine._cli_demo", "write a demo checkpoint (Hugging Face layout): the real "
                                                    "SmolLM2-135M-Instruct, or random weights of a size"),
    ("snapshot",): ("zerostart.snapshot._cli", "write a ready image of a model"),
    ("coldstart",): ("zerostart.bench.coldstart", "run real cold starts and print their phases"),
    ("simulate",): ("zerostart.sim._cli", "replay a request trace against keep-alive policies"),
    ("replay",): ("zerostart.sim._cli_replay", "drive a live server with a trace; set the simulator's prediction beside it"),
    ("plan",): ("zerostart.sim._cli_plan", "break-even calculator: is scale-to-zero worth it?"),
    ("pull",): ("zerostart.weights._cli_pull", "prefetch a checkpoint into the local cache"),
    ("prefetch",): ("zerostart.cluster._prefetch", "fetch every remote model of a config into this node's cache"),
    ("cache",): ("zerostart.weights._cli_cache", "list, remove and evict cached checkpoints"),
    ("bench", "load"): ("zerostart.bench.load", "benchmark weight loading against peers and the hardware limit"),
    ("bench", "generate"): ("zerostart.bench.generate", "benchmark generation against transformers"),
    ("bench", "serve"): ("zerostart.bench.serve", "benchmark gateway overhead and cold-start latency"),
    ("bench", "cluster"): ("zerostart.bench.cluster", "cold start and hot overhead through Ray Serve vs the gateway"),
    ("bench", "structured"): ("zerostart.bench.structured", "benchmark grammar-constrained decoding against free decoding"),
    ("bench", "engines"): ("zerostart.bench.engines", "cold starts and hot tokens/s: zerostart's rungs vs vLLM"),
    ("bench", "quant"): ("zerostart.bench.quant", "the quantized engine vs llama.cpp on the same GGUF files"),
}
# command groups (the first word of two-word commands) -> what they do
GROUPS: dict[str, str] = {
    "bench": "benchmarks that print a table (and write JSON with --json): zerostart against its peers run side by "
             "side, and against the physical limit measured in the same run",
}
# `zerostart serve` whose config names a cluster backend (--cluster ray, or cluster.backend in the
# file) is served by that backend's module, handed the config serve's command built: main(config)
CLUSTER_BACKENDS = {"ray": "zerostart.cluster._cli"}


def _build_parser(words: tuple[str, ...] | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerostart", description="Serve LLMs that scale to zero and come back fast.")
    parser.add_argument("--version", action="version", version=f"zerostart {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for key, (module_name, help_text) in COMMANDS.items():
        target = sub
        if len(key) == 2:
            if key[0] not in groups:
                group = sub.add_parser(key[0], help=GROUPS[key[0]], description=GROUPS[key[0]])
                groups[key[0]] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            target = groups[key[0]]
        p = target.add_parser(key[-1], help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if key == words:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def _command_words(argv: list[str]) -> tuple[str, ...] | None:
    for key in COMMANDS:
        if tuple(argv[: len(key)]) == key:
            return key
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(_command_words(argv))
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return _run(module, args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        return _fail(e)
    except Exception as e:
        # Our own errors (WeightsError, ConfigError, ...) name what failed; print them plainly.
        if type(e).__module__.startswith("zerostart"):
            return _fail(e)
        raise


def _run(module: ModuleType, args: argparse.Namespace) -> int:
    """The command's ``main``; for ``zerostart serve`` with a cluster backend, that backend's."""
    if args._module == COMMANDS[("serve",)][0]:
        config, _ = module.build_config(args)
        if config.cluster.backend is not None:
            return int(importlib.import_module(CLUSTER_BACKENDS[config.cluster.backend]).main(config))
        return int(module.serve(config))
    return int(module.main(args) or 0)


def _fail(e: BaseException) -> int:
    if os.environ.get("ZEROSTART_DEBUG"):
        raise e
    print(f"zerostart: error: {e}", file=sys.stderr)
    return 1
