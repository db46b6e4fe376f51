"""``zerostart bench structured``: what grammar-constrained decoding costs, in tokens/s.

Per batch size, three contestants in one run, interleaved, medians over ``--repeat``:
``free`` (greedy, no grammar), ``json_schema`` (every sequence constrained by a JSON schema
whose shortest document is longer than ``--max-tokens``, so every sequence produces exactly
``--max-tokens`` tokens, as the free ones do with end-of-sequence ignored) and ``mixed`` (half
of the batch constrained, half free, in the same steps). tokens/s counts generated tokens over
the whole wall time; the ratio is to ``free`` at the same batch size; batch 1 also gives the
fraction of the memory-bandwidth limit (weights read once per token at the copy bandwidth
measured in the same run). Constrained outputs are checked to be prefixes the schema allows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from zerostart.bench._engine_run import bandwidth, demo_model, machine, timed_batch
from zerostart.bench._env import log

# 64 required string items: no document shorter than a few hundred tokens exists
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "minLength": 8},
                                                     "minItems": 64}},
          "required": ["items"], "additionalProperties": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="Hugging Face model directory (default: the small demo model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes (default: 1,16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contestant and batch (default: 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def main(args: argparse.Namespace) -> int:
    # the engine's torch names: only when the benchmark runs, not at the command's start
    from zerostart.engine import Constraint, Engine, EngineConfig, SamplingParams

    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    model = args.model or demo_model("small")
    engine = Engine.from_pretrained(model, device=args.device,
                                    config=EngineConfig(max_num_seqs=max(batches), max_model_len=1024))
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "List some fruits as JSON."}]),
                        add_special_tokens=False) if tok.chat_templates else tok.encode("List some fruits as JSON:")
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.max_tokens, temperature=0, constraint=Constraint("json_schema", SCHEMA))
    t0 = time.perf_counter()
    engine.grammar()
    grammar_setup_s = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    bw = bandwidth(args.device)

    def run(params: list) -> tuple[float, list[list[int]], list[str]]:
        dt, evs = timed_batch(engine, args.device, [(prompt, p) for p in params])
        return dt, [[e.token_id for e in ev] for ev in evs], ["".join(e.text for e in ev) for ev in evs]

    rows = []
    for batch in batches:
        half = batch // 2
        contestants = {"free": [free] * batch, "json_schema": [constrained] * batch}
        if batch > 1:
            contestants["mixed"] = [constrained] * half + [free] * (batch - half)
        times: dict[str, list[float]] = {n: [] for n in contestants}
        for params in contestants.values():  # warm-up
            run(params)
        for _ in range(args.repeat):
            for name, params in contestants.items():
                dt, toks, texts = run(params)
                if any(len(t) != args.max_tokens for t in toks):
                    raise RuntimeError(f"{name}: generated {[len(t) for t in toks]} tokens, not {args.max_tokens} each")
                for p, text in zip(params, texts):
                    if p.constraint is not None and not "".join(text.split()).startswith('{"items":["'):
                        raise RuntimeError(f"{name}: constrained output {text[:60]!r} does not follow the schema")
                times[name].append(dt)
        row: dict[str, Any] = {"batch": batch}
        for name, ts in times.items():
            med = statistics.median(ts)
            row[name] = {"seconds": ts, "median_s": med, "tokens_per_s": batch * args.max_tokens / med}
        for name in times:
            row[name]["ratio_to_free"] = row[name]["tokens_per_s"] / row["free"]["tokens_per_s"]
        if batch == 1:
            row["decode_limit_tokens_per_s"] = bw * 1e9 / weight_bytes
        rows.append(row)
        log(f"batch {batch}: " + ", ".join(f"{n} {row[n]['tokens_per_s']:.1f} tok/s" for n in times))
    result = {"model": os.path.abspath(model), "device": args.device, "machine": machine(),
              "max_tokens": args.max_tokens, "repeat": args.repeat, "grammar_engine": "llguidance",
              "grammar_setup_s": grammar_setup_s, "bandwidth_gbps": bw, "weight_bytes": weight_bytes,
              "uptime": open("/proc/loadavg").read().strip(), "rows": rows}
    print(_table(result))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.json)
        log(f"wrote {args.json}")
    engine.stop()
    return 0


def _table(r: dict[str, Any]) -> str:
    lines = [f"constrained decoding (llguidance, json_schema) on {r['device']}, {r['max_tokens']} tokens per sequence, "
             f"medians of {r['repeat']}; load {r['uptime']}",
             f"{'batch':>5} {'contestant':12} {'tokens/s':>9} {'vs free':>8} {'of limit':>9}"]
    for row in r["rows"]:
        for name in ("free", "json_schema", "mixed"):
            if name not in row:
                continue
            c = row[name]
            limit = (f"{c['tokens_per_s'] / row['decode_limit_tokens_per_s']:9.1%}"
                     if "decode_limit_tokens_per_s" in row else f"{'':9}")
            lines.append(f"{row['batch']:5d} {name:12} {c['tokens_per_s']:9.1f} {c['ratio_to_free']:8.3f} {limit}")
    lines.append(f"grammar engine set-up (first constrained request): {r['grammar_setup_s']:.2f} s")
    return "\n".join(lines)
