"""float32 against bfloat16 for the matmuls of a decoder layer on this CPU, interleaved.

    python bench/cpu_matmul_dtypes.py [--hidden 576 --intermediate 1536 --q 576 --kv 192] [--rounds 9] [--json OUT]

The four projections of one layer (q/k/v fused, o, gate/up fused, down: SmolLM2-135M's shapes by
default) at M rows = 1 and 16 (decode, memory bound: bfloat16 reads half the bytes) and 512
(prefill, compute bound: native bfloat16 dot products where the CPU has them), one thread,
float32 and bfloat16 alternating round by round; medians, best runs and the ratio. This is the
kernel-level half of the evidence for the CPU's default dtype (docs/engine.md, "bfloat16 on
CPU"); the end-to-end half is ``zerostart bench generate --dtype float32,bfloat16``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zerostart.names import cpu_has_bf16  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--q", type=int, default=576)
    p.add_argument("--kv", type=int, default=192)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    h, i = args.hidden, args.intermediate
    shapes = [(args.q + 2 * args.kv, h), (h, args.q), (2 * i, h), (h, i)]  # qkv, o, gate/up, down: [out, in]
    weights = {dt: [torch.randn(o, k).to(dt) for o, k in shapes] for dt in (torch.float32, torch.bfloat16)}
    result = {"cpu_has_bf16": cpu_has_bf16(), "torch": torch.__version__, "shapes": shapes, "rounds": args.rounds,
              "loadavg_start": os.getloadavg()[0], "rows": {}}
    for m in (1, 16, 512):
        reps = 30 if m < 100 else 3
        times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for _ in range(args.rounds):
            for dt in (torch.float32, torch.bfloat16):
                xs = {k: torch.randn(m, k).to(dt) for _, k in shapes}
                t = time.perf_counter()
                for _ in range(reps):
                    for w in weights[dt]:
                        torch.nn.functional.linear(xs[w.shape[1]], w)
                times[str(dt).removeprefix("torch.")].append((time.perf_counter() - t) / reps)
        f, b = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
        result["rows"][m] = {"seconds": times, "float32_over_bfloat16": f / b,
                             "best_float32_over_bfloat16": min(times["float32"]) / min(times["bfloat16"])}
        print(f"M={m:>4}: one layer's matmuls float32 {f * 1e3:7.2f} ms, bfloat16 {b * 1e3:7.2f} ms (medians of "
              f"{args.rounds}); bfloat16 {f / b:.2f}x faster (best runs {min(times['float32']) / min(times['bfloat16']):.2f}x)")
    result["loadavg_end"] = os.getloadavg()[0]
    print(f"(cpu_has_bf16: {result['cpu_has_bf16']}; load average {result['loadavg_start']:.1f} -> {result['loadavg_end']:.1f})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
