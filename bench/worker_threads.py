"""Decode speed of one CPU worker by compute threads, on a quiet host and beside busy processes.

    python bench/worker_threads.py MODEL [--threads 1,2] [--busy 0,1] [--rounds 5] [--json OUT]

Each measurement is a fresh process that loads MODEL (float32 and bfloat16) and times greedy
decoding of 32 tokens after a short prompt, three times; ``--busy N`` runs N processes that
spin on a core each meanwhile (another model's worker, a build, a neighbour on a shared host).
Configurations are interleaved round by round and the medians printed with the host's load.
This is how the server's rule for a worker's threads was chosen (docs/engine.md, "Threads").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import sys, time, torch
threads, dtype, model = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(threads)
from zerostart.engine import Engine, EngineConfig, SamplingParams
e = Engine.from_pretrained(model, dtype=dtype, config=EngineConfig(max_num_seqs=1, max_model_len=256))
ids = e.tokenizer.encode("Once upon a time")
params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
list(e.generate(ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
rates = []
for _ in range(3):
    t = time.perf_counter()
    n = sum(1 for _ in e.generate(ids, params))
    rates.append(n / (time.perf_counter() - t))
print(sorted(rates)[1])
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--busy", default="0,1")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=root)
    configs = [(int(t), int(b), d) for b in args.busy.split(",") for t in args.threads.split(",")
               for d in args.dtypes.split(",")]
    runs: dict[str, list[float]] = {}
    loads = []
    for r in range(args.rounds):
        for threads, busy, dtype in configs:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                time.sleep(0.5)
                loads.append(os.getloadavg()[0])
                out = subprocess.run([sys.executable, "-c", CHILD, str(threads), dtype, args.model], env=env,
                                     capture_output=True, text=True, timeout=900)
            finally:
                for s in spinners:
                    s.kill()
                    s.wait()
            if out.returncode != 0:
                raise SystemExit(out.stderr[-2000:])
            key = f"threads={threads} busy={busy} {dtype}"
            runs.setdefault(key, []).append(float(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {key}: {runs[key][-1]:.2f} tok/s", file=sys.stderr, flush=True)
    print(f"decode tokens/s, median of {args.rounds} rounds ({os.cpu_count()} CPUs, load average "
          f"{min(loads):.1f}-{max(loads):.1f} while measuring)")
    for key, rates in runs.items():
        print(f"  {key:<32} {statistics.median(rates):6.2f}   (runs: {', '.join(f'{x:.1f}' for x in rates)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "cpus": os.cpu_count(), "rounds": args.rounds, "loadavg": loads,
                       "runs": runs, "medians": {k: statistics.median(v) for k, v in runs.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
