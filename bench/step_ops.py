"""The engine's fused step ops against the torch ops they replace, in one process.

    python bench/step_ops.py [MODEL ...] [--quantize auto,none] [--threads 1] [--tokens 64] [--rounds 5] [--json OUT]

For each model, ``quantize`` setting and thread count: batch-1 greedy decode of ``--tokens``
tokens through ``Engine.generate`` three ways, alternating round by round:

- ``torch``: the torch reference ops (``Transformer.use_kernels(False)``);
- ``fused``: the kernels' fused ops, called layer by layer from Python
  (``use_kernels(True, stack=False)``);
- ``stack``: the same ops, a decode step's layers in one library call (``use_kernels(True)``:
  the default on a CPU with the kernels built).

It prints the median tokens/s of each and the ATen calls a token makes (torch.profiler, nested
calls included; the library's own calls are not ATen ops and are not counted). MODEL defaults
to SmolLM2-135M-Instruct's Q4_1 GGUF file (``quantize: auto`` holds it as its quants, ``none``
as floats: bfloat16 where the CPU computes it natively).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Literal

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zerostart.engine import Engine, EngineConfig, SamplingParams, quant_kernels  # noqa: E402
from zerostart.engine.demo import smollm2_gguf  # noqa: E402

PROMPT = "The capital of France is a city that"
Quantize = Literal["auto", "none", "int8", "int4"]  # EngineConfig.quantize
QUANTIZE: tuple[Quantize, ...] = ("auto", "none", "int8", "int4")
MODES = {"torch": (False, False), "fused": (True, False), "stack": (True, True)}  # use_kernels(on, stack)


def aten_calls(engine: Engine, ids: list[int], tokens: int) -> int:
    from torch.profiler import ProfilerActivity, profile  # the profiler only here

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        list(engine.generate(ids, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)))
    return sum(e.count for e in prof.key_averages()) // tokens


def one_model(path: str, quantize: Quantize, threads: int, tokens: int, rounds: int) -> list[dict[str, Any]]:
    engine = Engine.from_pretrained(path, config=EngineConfig(max_model_len=2048, threads=threads, quantize=quantize))
    ids = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    for on, stack in MODES.values():  # first calls
        engine.model.use_kernels(on, stack)
        list(engine.generate(ids, SamplingParams(max_tokens=4, temperature=0.0)))
    for _ in range(rounds):
        for mode, (on, stack) in MODES.items():
            engine.model.use_kernels(on, stack)
            t = time.perf_counter()
            n = sum(1 for _ in engine.generate(ids, params))
            runs[mode].append(n / (time.perf_counter() - t))
    out = []
    for mode, (on, stack) in MODES.items():
        engine.model.use_kernels(on, stack)
        out.append({"model": os.path.basename(path), "quantize": quantize, "dtype": str(engine.dtype).removeprefix("torch."),
                    "threads": threads, "ops": mode, "decode_b1_tok_s": round(statistics.median(runs[mode]), 1),
                    "runs": [round(r, 1) for r in runs[mode]], "aten_calls_per_token": aten_calls(engine, ids, 16)})
    engine.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*")
    p.add_argument("--quantize", default="auto,none")
    p.add_argument("--threads", default="1", help="comma-separated thread counts")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    asked = args.quantize.split(",")
    if unknown := [q for q in asked if q not in QUANTIZE]:
        raise SystemExit(f"--quantize: {', '.join(unknown)} not among {', '.join(QUANTIZE)}")
    quantize_settings = [q for name in asked for q in QUANTIZE if q == name]
    result: dict[str, Any] = {"torch": torch.__version__, "kernels": quant_kernels(build=True),
                              "loadavg_start": os.getloadavg()[0], "rows": []}
    print("| model | quantize | dtype | threads | ops | decode b1 tok/s | ATen calls per token |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: |")
    for path in args.models or [smollm2_gguf()]:
        for quantize in quantize_settings:
            for threads in [int(t) for t in args.threads.split(",")]:
                rows = one_model(path, quantize, threads, args.tokens, args.rounds)
                for r in rows:
                    print(f"| {r['model']} | {r['quantize']} | {r['dtype']} | {threads} | {r['ops']} "
                          f"| {r['decode_b1_tok_s']} | {r['aten_calls_per_token']:,} |", flush=True)
                torch_, fused, stack = (r["decode_b1_tok_s"] for r in rows)
                print(f"(fused / torch {fused / torch_:.2f}x, stack / fused {stack / fused:.2f}x)")
                result["rows"] += rows
    result["loadavg_end"] = os.getloadavg()[0]
    print(f"(load average {result['loadavg_start']:.1f} -> {result['loadavg_end']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
