"""Park and wake an engine on CUDA; print the wake bandwidth beside pinned host->device.

    python bench/park_wake.py [--size 1b] [--repeat 5] [--json OUT]

The engine is loaded with VMM-backed weights and KV cache, generates greedily, is parked
(weights to registered host memory, device memory released) and woken (same addresses) several
times; its output after every wake must equal the output before the first park (CUDA graphs
intact).
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
from zerostart import snapshot, weights  # noqa: E402
from zerostart.bench import pinned_h2d  # noqa: E402
from zerostart.engine import Engine, SamplingParams  # noqa: E402
from zerostart.engine.demo import write_demo_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    d = os.path.join(weights.cache_dir(), "demo", a.size)
    write_demo_model(d, size=a.size)
    e = Engine.from_pretrained(d, device="cuda", allocator=snapshot.vmm_allocator)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref = [ev.token_id for ev in e.generate("the cold start", params) if ev.token_id is not None]
    parking = snapshot.EngineParking(e)
    h2d = pinned_h2d("cuda")
    runs = []
    same = True
    for _ in range(a.repeat):
        free0 = torch.cuda.mem_get_info()[0]
        parking.park()
        freed = torch.cuda.mem_get_info()[0] - free0
        t0 = time.perf_counter()
        parking.wake()
        wake_s = time.perf_counter() - t0
        out = [ev.token_id for ev in e.generate("the cold start", params) if ev.token_id is not None]
        same = same and out == ref
        st = parking.weights.stats
        runs.append({"weights_bytes": st.bytes, "park_s": st.park_s, "wake_s": wake_s, "weights_wake_s": st.wake_s,
                     "weights_wake_gbps": st.wake_gbps, "weights_copy_s": st.wake_copy_s,
                     "weights_copy_gbps": st.wake_copy_gbps, "device_bytes_freed": freed})
        time.sleep(0.5)  # let the host copy's unpinning finish before the next park
    med = statistics.median(r["weights_wake_gbps"] for r in runs)
    med_copy = statistics.median(r["weights_copy_gbps"] for r in runs)
    rep = {"model": d, "size": a.size, "dtype": str(e.dtype), "gpu": torch.cuda.get_device_name(), "pinned_h2d_gbps": h2d,
           "wake_gbps_median": med, "of_h2d": med / h2d, "copy_gbps_median": med_copy, "copy_of_h2d": med_copy / h2d, "outputs_identical_after_wake": same, "graphs": len(e.runner._graphs),
           "runs": runs}
    print(f"park/wake {a.size} ({runs[0]['weights_bytes'] / 1e9:.2f} GB weights, {e.dtype}) on {rep['gpu']}: "
          f"wake {med:.1f} GB/s = {med / h2d * 100:.0f}% of pinned H2D {h2d:.1f} GB/s (the copy alone "
          f"{med_copy:.1f} GB/s = {med_copy / h2d * 100:.0f}%, the rest is re-mapping device memory); "
          f"park {statistics.median(r['park_s'] for r in runs):.3f} s; freed {runs[0]['device_bytes_freed'] / 1e9:.2f} GB; "
          f"outputs identical after every wake: {same}; CUDA graphs: {rep['graphs']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
