"""``zerostart bench generate --baseline DIR``: the same measurements with another checkout's
code (e.g. ``main``) and with this one, in fresh processes taking turns, so a change is
measured before and after in one run, under the same load.

Each turn is this file run as a script with ``PYTHONPATH`` set to one checkout: it imports that
checkout's engine and uses only the API every version has (``Engine.from_pretrained``,
``submit``, ``step``, ``logits``). It measures decode tokens/s at each batch size (one timed batch
after a warm-up one), prefill tokens/s (one prompt's logits), and the ATen calls of one batch-1
decode step (torch.profiler, nested calls included), and prints them as one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def run(args, model: str, dtypes: list[str], baseline: str, bandwidth_gbps: float) -> dict[str, Any]:
    """``--repeat`` turns of each checkout per dtype, alternating; medians and paired ratios."""
    # this file also runs as a script against another checkout: nothing of zerostart at its top
    from zerostart.bench._env import log

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    checkouts = {"before": os.path.abspath(baseline), "after": here}
    if not os.path.isfile(os.path.join(checkouts["before"], "zerostart", "__init__.py")):
        raise SystemExit(f"zerostart: error: --baseline {baseline!r} is not a zerostart checkout (no zerostart/__init__.py)")
    out: dict[str, Any] = {"checkouts": checkouts, "settings": "engine defaults" if args.engine_defaults else "bench",
                           "dtypes": {}}
    for dtype in dtypes:
        turns: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for _ in range(args.repeat):
            for name, root in checkouts.items():
                turns[name].append(_turn(args, model, dtype, root))
        out["dtypes"][dtype] = _summary(turns, bandwidth_gbps)
        after, before = out["dtypes"][dtype]["after"], out["dtypes"][dtype]["before"]
        log(f"{dtype} before -> after: " + ", ".join(f"{k} {before[k]:.1f} -> {after[k]:.1f}" for k in after
                                                      if k.endswith("tok_s")))
    return out


def _turn(args, model: str, dtype: str, root: str) -> dict[str, Any]:
    from zerostart.bench._env import child_env  # (as in run: this file also runs against another checkout)

    cmd = [sys.executable, os.path.abspath(__file__), json.dumps({
        "model": model, "dtype": dtype, "device": args.device, "threads": args.threads, "defaults": args.engine_defaults,
        "batches": [int(b) for b in args.batch.split(",") if b.strip()], "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "prefill_tokens": args.prefill_tokens})]
    env = child_env()
    env["PYTHONPATH"] = root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"the {root} turn ({dtype}) failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _summary(turns: dict[str, list[dict[str, Any]]], bw: float) -> dict[str, Any]:
    keys = [k for k in turns["after"][0] if k.endswith("tok_s") or k == "aten_ops"]
    out: dict[str, Any] = {"turns": turns}
    for name, ts in turns.items():
        out[name] = {k: statistics.median(t[k] for t in ts) for k in keys}
        out[name]["slots"] = ts[0]["slots"]
        out[name]["b1_fraction_of_bandwidth"] = out[name].get("b1_tok_s", 0) * ts[0]["weight_bytes"] / (bw * 1e9)
    out["paired_ratio"] = {k: statistics.median(a[k] / b[k] for a, b in zip(turns["after"], turns["before"]))
                           for k in keys}
    return out


def table(r: dict[str, Any]) -> list[str]:
    b = r.get("baseline")
    if not b:
        return []
    lines = [f"before -> after ({b['settings']} settings; before: {b['checkouts']['before']}), one process per turn, "
             f"turns alternating, medians; ratio: median of the paired turns",
             f"{'dtype':>9}  {'measure':<14} {'before':>9} {'after':>9} {'ratio':>7}"]
    for dtype, d in b["dtypes"].items():
        for k, ratio in d["paired_ratio"].items():
            lines.append(f"{dtype:>9}  {k:<14} {d['before'][k]:>9.1f} {d['after'][k]:>9.1f} {ratio:>6.2f}x")
        lines.append(f"{dtype:>9}  {'slots':<14} {d['before']['slots']:>9} {d['after']['slots']:>9}")
        lines.append(f"{dtype:>9}  {'b1 of bw':<14} {d['before']['b1_fraction_of_bandwidth']:>9.0%} "
                     f"{d['after']['b1_fraction_of_bandwidth']:>9.0%}")
    return lines


# -- a turn (runs in the child, against either checkout's engine) ---------------------------------

def _child(spec: dict[str, Any]) -> dict[str, Any]:
    # the measured checkout's engine, whichever PYTHONPATH named
    import torch

    from zerostart.engine import Engine, EngineConfig, SamplingParams

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    most = max(spec["batches"])
    cfg = EngineConfig() if spec["defaults"] else EngineConfig(
        max_model_len=max(spec["prompt_tokens"] + spec["max_tokens"], spec["prefill_tokens"]) + 8, max_num_seqs=most)
    e = Engine.from_pretrained(spec["model"], device=spec["device"], dtype=spec["dtype"], config=cfg)
    vocab, bos = e.model_config.vocab_size, e.tokenizer.bos_token_id

    def ids(b: int, n: int) -> list[int]:  # the prompts of zerostart.bench.generate.prompts
        out = [((b * 7919 + i * 104729) % (vocab - 300)) + 300 for i in range(n)]
        if bos is not None:
            out[0] = bos
        return out

    def sync() -> None:
        if spec["device"].startswith("cuda"):
            torch.cuda.synchronize()

    def batch(n: int, max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        sync()
        t = time.perf_counter()
        handles = [e.submit(ids(b, spec["prompt_tokens"]), params) for b in range(n)]
        while any(not h.finished for h in handles):
            e.step()
        sync()
        dt = time.perf_counter() - t
        if any(len(list(h)) != max_tokens for h in handles):
            raise RuntimeError("a sequence did not generate every token asked for")
        return dt

    res: dict[str, Any] = {"slots": e.num_slots,
                           "weight_bytes": sum(p.numel() * p.element_size() for p in e.model.parameters())}
    for n in spec["batches"]:
        batch(n, 4)
        res[f"b{n}_tok_s"] = n * spec["max_tokens"] / batch(n, spec["max_tokens"])
    prompt = ids(0, spec["prefill_tokens"])
    e.logits(prompt, chunk=len(prompt))
    sync()
    t = time.perf_counter()
    e.logits(prompt, chunk=len(prompt))
    sync()
    res["prefill_tok_s"] = len(prompt) / (time.perf_counter() - t)
    from torch.profiler import profile  # only the profiling step needs it

    h = e.submit(ids(0, spec["prompt_tokens"]), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    e.step()
    e.step()
    with profile() as prof:
        e.step()
    res["aten_ops"] = sum(ev.name.startswith("aten::") for ev in prof.events())
    h.cancel()
    while not h.finished:
        e.step()
    return res


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
