"""The kernels a quantized decoder could run on this CPU, side by side, per batch regime.

    python bench/quant_kernels.py [--threads 1,2] [--rows 1,16,128] [--rounds 7] [--json OUT]

SmolLM2-135M's matmuls of one decode step (30 layers of q/k/v, o, gate/up, down at 4 bits;
the 49152 x 576 LM head at 8 bits, as its Q4_1 GGUF file holds them; every layer its own
weights, so a step reads them all from memory), each candidate in turn round by round, medians. Candidates: float32 and bfloat16 ``F.linear`` (the floats the engine
held before), PyTorch's own weight-only ops (``_weight_int4pack_mm_for_cpu``, group 32;
``_weight_int8pack_mm``, per channel: no group scales, so not GGUF's values), fbgemm's dynamic
int8 linear (per channel, activations quantized), and zerostart's kernels over the GGUF values
(group scales): ``qmm_tiles`` (tiled rows, activations rounded to int8 per group, VNNI),
``qmm`` (row layout, dequantized in registers, float activations), and ``untile`` + a bfloat16
``F.linear`` (prefill); and for bfloat16 weights (an F16/BF16 file) ``mv_bf16``, the engine's
matrix-vector beside torch's bfloat16 ``F.linear``. torchao 0.18's x86 wheel ships no CPU kernels (its
CPU paths call these same PyTorch ops), so it is not a separate candidate. Prints each
candidate's step time, and for the b1 step the fraction of the one-thread read bandwidth
measured in the same run with as many threads (bytes of the held weights / time / bandwidth):
the quantized bytes for the quantized kernels, two bytes a weight for the bfloat16 ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zerostart.engine import EngineError, cpu_kernels, quant_kernels  # noqa: E402

LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # [N, K] at 4 bits
HEAD = (49152, 576)  # at 8 bits


def _q(N: int, K: int, bits: int):
    if bits == 4:
        return (torch.randint(0, 256, (N, K // 2), dtype=torch.uint8), (torch.rand(N, K // 32) * 0.01).half(),
                (torch.randn(N, K // 32) * 0.01).half())
    return torch.randint(-127, 128, (N, K), dtype=torch.int8), (torch.rand(N, K // 32) * 0.01).half(), None


def _untile_linear(xb: torch.Tensor, qt: torch.Tensor, st: torch.Tensor, mt: torch.Tensor | None, bits: int) -> torch.Tensor:
    return F.linear(xb, cpu_kernels().untile(qt, st, mt, bits, 32).bfloat16())


def candidates(rows: int) -> dict[str, list]:
    """name -> one decode step's calls: each layer's own matrices (30 distinct copies, so the
    step streams every byte from memory as the model does), then the head."""
    out: dict[str, list] = {}
    mats = [(N, K, 4) for _ in range(LAYERS) for N, K in SHAPES.values()] + [(HEAD[0], HEAD[1], 8)]
    ops = cpu_kernels()
    for name in ("float32", "bfloat16", "torch int4pack (bf16)", "torch int8pack per-channel (bf16)",
                 "fbgemm dynamic int8 per-channel", "zerostart qmm_tiles", "zerostart qmm", "zerostart untile + F.linear bf16", "zerostart mv_bf16"):
        calls: list[Callable[[], Any]] = []
        xs = {K: torch.randn(rows, K) for K in {k for _, k, _ in mats}}
        for N, K, bits in mats:
            x = xs[K]
            if name == "zerostart mv_bf16":
                calls.append(partial(ops.mv_bf16, x.bfloat16(), torch.randn(N, K).bfloat16(), None))
            elif name in ("float32", "bfloat16"):
                dt = torch.float32 if name == "float32" else torch.bfloat16
                calls.append(partial(F.linear, x.to(dt), torch.randn(N, K).to(dt)))
            elif name.startswith("torch int4pack"):
                packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1)
                calls.append(partial(torch._weight_int4pack_mm_for_cpu, x.bfloat16(), packed, 32,
                                     torch.randn(K // 32, N, 2).bfloat16()))
            elif name.startswith("torch int8pack"):
                w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
                calls.append(partial(torch._weight_int8pack_mm, x.bfloat16(), w8, torch.rand(N).bfloat16()))
            elif name.startswith("fbgemm"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lin = torch.ao.nn.quantized.dynamic.Linear(K, N, dtype=torch.qint8)
                    qw = torch.quantize_per_channel(torch.randn(N, K) * 0.02, torch.rand(N) * 1e-3 + 1e-4,
                                                    torch.zeros(N, dtype=torch.long), 0, torch.qint8)
                    lin.set_weight_bias(qw, None)
                calls.append(partial(lin, x))
            else:
                qw, sc, mn = _q(N, K, bits)
                if name == "zerostart qmm":
                    calls.append(partial(ops.qmm, x, qw, sc, mn, bits, 32))
                    continue
                t = ops.tile(qw, sc, mn, bits, 32)
                qt, st, mt = t[0], t[1], t[2] if mn is not None else None
                if name == "zerostart qmm_tiles":
                    calls.append(partial(ops.qmm_tiles, x, qt, st, mt, bits, 32))
                else:
                    calls.append(partial(_untile_linear, x.bfloat16(), qt, st, mt, bits))
        out[name] = calls
    return out


def step_time(calls: list) -> float:
    """One decode step's matmuls, in model order (every weight read once)."""
    t = time.perf_counter()
    for fn in calls:
        fn()
    return time.perf_counter() - t


def read_bandwidth() -> float:
    """Read bandwidth from memory (GB/s) with torch's threads: the median of summing 512 MB."""
    buf = torch.ones(128 << 20)  # 512 MB of float32, past every cache
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        ts.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(ts) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", default="1,16,128")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    try:
        kernel = quant_kernels(build=True)
    except EngineError as e:
        print(f"quant_kernels: {e}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    held = sum(N * K // 2 + N * K // 32 * 4 for N, K in SHAPES.values()) * LAYERS + HEAD[0] * HEAD[1] * (1 + 2 / 32)
    held_bf16 = 2 * (sum(N * K for N, K in SHAPES.values()) * LAYERS + HEAD[0] * HEAD[1])
    result: dict[str, Any] = {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
              "kernel": kernel, "loadavg_start": os.getloadavg()[0],
              "held_bytes_b1": held, "held_bytes_bf16": held_bf16, "read_gbps": {}, "runs": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        gbps = result["read_gbps"][threads] = read_bandwidth()
        print(f"threads={threads}: read bandwidth {gbps:.1f} GB/s; the quantized step reads {held / 1e6:.1f} MB")
        for rows in [int(r) for r in args.rows.split(",")]:
            cands = candidates(rows)
            times: dict[str, list[float]] = {n: [] for n in cands}
            for calls in cands.values():
                step_time(calls)  # first calls
            for _ in range(args.rounds):
                for n, calls in cands.items():
                    times[n].append(step_time(calls))
            for n, ts in times.items():
                med = statistics.median(ts)
                row = {"threads": threads, "rows": rows, "candidate": n, "step_ms": round(med * 1e3, 3),
                       "ms": [round(t * 1e3, 3) for t in ts]}
                if rows == 1 and n.startswith("zerostart qmm"):
                    row["fraction_of_read_bandwidth"] = round(held / med / 1e9 / gbps, 3)
                elif rows == 1 and n in ("bfloat16", "zerostart mv_bf16"):
                    row["fraction_of_read_bandwidth"] = round(held_bf16 / med / 1e9 / gbps, 3)
                result["runs"].append(row)
                extra = f"  ({row['fraction_of_read_bandwidth']:.0%} of the read bandwidth)" if "fraction_of_read_bandwidth" in row else ""
                print(f"threads={threads} rows={rows:>3}  {n:36s} {med * 1e3:8.2f} ms{extra}", flush=True)
    result["loadavg_end"] = os.getloadavg()[0]
    print(f"(load average {result['loadavg_start']:.1f} -> {result['loadavg_end']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
