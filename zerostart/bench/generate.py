"""``zerostart bench generate``: generation speed and cold start against transformers, in one run.

Throughput: greedy generation of ``--max-tokens`` tokens after a ``--prompt-tokens`` prompt, at
each batch size, zerostart (continuous batching engine) and transformers' ``generate`` on the
same model, device and dtype; runs interleaved, medians over ``--repeat``. tokens/s counts
generated tokens over the whole wall time (prefill included). Every run must produce exactly
the requested tokens per sequence (end-of-sequence is ignored by both), so nobody wins by
stopping early. The table also gives batch-1 decode speed as a fraction of its memory-bandwidth
limit (weights read once per token, at the copy bandwidth measured in the same run).

Cold start: fresh processes from spawn to the first generated token, split into spawn (the
interpreter starting), import, load (device init, read, prepare), warm-up and first token.
Timestamps are CLOCK_MONOTONIC (``time.perf_counter`` on Linux), shared by parent and child.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # the child's first statement (cold-start runs)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402
from zerostart.bench._engine_run import bandwidth as _bandwidth, demo_model as _demo, machine as _machine  # noqa: E402
from zerostart.bench._engine_run import sync as _sync  # noqa: E402
from zerostart.bench._env import log as _log  # noqa: E402

COLD_COLUMNS = ("spawn", "import", "load", "warmup", "first_token")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="Hugging Face model directory (default: a demo model)")
    parser.add_argument("--size", default="small", choices=("tiny", "small", "1b"),
                        help="demo model size when --model is not given (default: small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes (default: 1,16)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per sequence (default: 128)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per contestant and batch (default: 5)")
    parser.add_argument("--cold-repeat", type=int, default=3, help="cold-start processes per contestant (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both (default: torch's)")
    parser.add_argument("--no-transformers", action="store_true", help="time zerostart alone")
    parser.add_argument("--cuda-graphs", choices=("on", "off"), default="on", help="decode CUDA graphs (default: on)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--child", choices=("zerostart", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.child:
        return _cold_child(args)
    if args.repeat < 1 or args.cold_repeat < 0 or args.max_tokens < 2 or args.prompt_tokens < 1:
        raise SystemExit("zerostart: error: --repeat >= 1, --cold-repeat >= 0, --max-tokens >= 2, --prompt-tokens >= 1")
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"zerostart: error: --batch must list integers (got {args.batch!r})") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = args.model or _demo(args.size)
    result: dict[str, Any] = {"model": os.path.abspath(model), "device": args.device, "machine": _machine(),
                              "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                              "repeat": args.repeat}
    _log(f"model {model} on {args.device}")
    result["throughput"], result["bandwidth_gbps"], result["dtype"], result["weight_bytes"] = _throughput(
        args, model, batches)
    result["cold_start"] = _cold(args, model)
    print(_table(result))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.json)
        _log(f"wrote {args.json}")
    return 0


# -- throughput ------------------------------------------------------------------------------

def _prompts(vocab: int, batch: int, n: int, bos: int | None) -> list[list[int]]:
    # distinct prompts of the same length, ordinary tokens only
    out = []
    for b in range(batch):
        ids = [((b * 7919 + i * 104729) % (vocab - 300)) + 300 for i in range(n)]
        if bos is not None:
            ids[0] = bos
        out.append(ids)
    return out


def _throughput(args, model_path: str, batches: list[int]):
    import torch

    from zerostart.engine import Engine, EngineConfig, SamplingParams

    max_len = args.prompt_tokens + args.max_tokens + 8
    cfg = EngineConfig(max_model_len=max_len, max_num_seqs=max(batches), cuda_graphs=args.cuda_graphs == "on",
                       compile=args.compile)
    engine = Engine.from_pretrained(model_path, device=args.device, dtype=args.dtype, config=cfg)
    dtype = engine.dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    bw = _bandwidth(args.device)
    hf = None
    if not args.no_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(args.device).eval()
        hf.generation_config.eos_token_id = None  # run every sequence to max_tokens, like ignore_eos
        hf.generation_config.pad_token_id = 0
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    rows = []
    for batch in batches:
        prompts = _prompts(vocab, batch, args.prompt_tokens, engine.tokenizer.bos_token_id)

        def run_zs() -> tuple[float, list[list[int]]]:
            _sync(args.device)
            t = time.perf_counter()
            handles = [engine.submit(p, params) for p in prompts]
            while any(not h.finished for h in handles):
                engine.step()
            _sync(args.device)
            dt = time.perf_counter() - t
            return dt, [[ev.token_id for ev in h] for h in handles]

        def run_hf() -> tuple[float, list[list[int]]]:
            ids = torch.tensor(prompts, device=args.device)
            _sync(args.device)
            t = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                  do_sample=False)
            _sync(args.device)
            dt = time.perf_counter() - t
            return dt, out[:, ids.shape[1]:].tolist()

        contestants = [("zerostart", run_zs)] + ([("transformers", run_hf)] if hf is not None else [])
        times: dict[str, list[float]] = {name: [] for name, _ in contestants}
        outputs: dict[str, list[list[int]]] = {}
        for name, fn in contestants:  # warm-up run each
            _, outputs[name] = fn()
        for _ in range(args.repeat):
            for name, fn in contestants:  # interleaved
                dt, toks = fn()
                if any(len(t) != args.max_tokens for t in toks):
                    raise RuntimeError(f"{name} generated {[len(t) for t in toks]} tokens, not {args.max_tokens} each")
                times[name].append(dt)
        row: dict[str, Any] = {"batch": batch}
        for name in times:
            med = statistics.median(times[name])
            row[name] = {"seconds": times[name], "median_s": med, "tokens_per_s": batch * args.max_tokens / med}
        if hf is not None:
            row["ratio"] = row["zerostart"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
            same = sum(a == b for a, b in zip(outputs["zerostart"], outputs["transformers"]))
            row["same_tokens"] = f"{same}/{batch}"
        if batch == 1:
            row["decode_limit_tokens_per_s"] = bw * 1e9 / weight_bytes
            row["fraction_of_limit"] = row["zerostart"]["tokens_per_s"] / row["decode_limit_tokens_per_s"]
        rows.append(row)
        _log(f"batch {batch}: " + ", ".join(f"{n} {row[n]['tokens_per_s']:.1f} tok/s" for n in times))
    del engine, hf
    return rows, bw, str(dtype).replace("torch.", ""), weight_bytes


# -- cold start ------------------------------------------------------------------------------

def _cold(args, model_path: str) -> dict[str, Any]:
    import zerostart

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    contestants = ["zerostart"] + ([] if args.no_transformers else ["transformers"])
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in contestants}
    for _ in range(args.cold_repeat):
        for c in contestants:  # interleaved
            cmd = [sys.executable, "-m", "zerostart", "bench", "generate", "--child", c, "--model", model_path,
                   "--device", args.device, "--prompt-tokens", str(args.prompt_tokens)]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.cuda_graphs == "off":
                cmd += ["--cuda-graphs", "off"]
            if args.compile:
                cmd += ["--compile"]
            t0 = time.perf_counter()
            r = subprocess.run(cmd + ["--t0", repr(t0)], capture_output=True, text=True, env=env, timeout=1800)
            if r.returncode != 0:
                raise RuntimeError(f"cold-start child ({c}) failed:\n{r.stderr[-2000:]}")
            runs[c].append(json.loads(r.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {}
    for c, rs in runs.items():
        if rs:
            out[c] = {"runs": rs, "median": {k: statistics.median(r[k] for r in rs) for k in rs[0]}}
    return out


def _cold_child(args) -> int:
    # One cold start, from the parent's spawn to the first token; prints one JSON line.
    t0 = args.t0
    spawn_end = _T_START
    if args.child == "zerostart":
        from zerostart.engine import Engine  # torch and the engine
        from zerostart.telemetry import Timeline

        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        from zerostart.engine import EngineConfig, SamplingParams

        tl = Timeline(origin=t0)
        cfg = EngineConfig(max_model_len=args.prompt_tokens + 64, max_num_seqs=1,
                           cuda_graphs=args.cuda_graphs == "on", compile=args.compile)
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, config=cfg,
                                                timeline=tl)
        prompt = _prompts(engine.model_config.vocab_size, 1, args.prompt_tokens, engine.tokenizer.bos_token_id)[0]
        t = time.perf_counter()
        next(iter(engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0))))
        first = time.perf_counter()
        phases = {p.name: p for p in tl.phases}
        import_end = phases["import"].end + t0 if "import" in phases else spawn_end
        load_end = phases["prepare"].end + t0
        warm_end = phases["warmup"].end + t0
        out = {"spawn": spawn_end - t0, "import": import_end - spawn_end, "load": load_end - import_end,
               "warmup": warm_end - load_end, "first_token": first - t}
    else:
        import torch
        import transformers

        if args.threads:
            torch.set_num_threads(args.threads)
        import_end = time.perf_counter()
        from zerostart.names import default_dtype, device_type, dtype_name

        dtype = getattr(torch, dtype_name(args.dtype) if args.dtype else default_dtype(device_type(args.device)))
        if args.device.startswith("cuda"):
            torch.empty(1, device=args.device)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        _sync(args.device)
        load_end = time.perf_counter()
        prompt = _prompts(model.config.vocab_size, 1, args.prompt_tokens, tok.bos_token_id)[0]
        ids = torch.tensor([prompt], device=args.device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=0)
        _sync(args.device)
        first = time.perf_counter()
        out = {"spawn": spawn_end - t0, "import": import_end - spawn_end, "load": load_end - import_end,
               "warmup": 0.0, "first_token": first - t}
    out["total"] = first - t0
    print(json.dumps(out))
    return 0


# -- report ----------------------------------------------------------------------------------

def _table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"zerostart bench generate: {os.path.basename(r['model'])} on {r['device']} ({r['dtype']}), "
             f"torch {m['torch']}, transformers {m.get('transformers', '-')}, {m['cpu_count']} CPUs, "
             f"{m['torch_threads']} torch threads" + (f", {m['gpu']}" if "gpu" in m else ""),
             f"throughput: greedy, prompt {r['prompt_tokens']} tokens, {r['max_tokens']} new tokens per sequence, "
             f"median of {r['repeat']} runs (tokens/s over the whole call, prefill included)",
             f"{'batch':>5}  {'zerostart':>10}  {'transformers':>12}  {'ratio':>6}  {'same tokens':>11}  "
             f"{'of bw limit':>11}"]
    for row in r["throughput"]:
        hf = row.get("transformers", {}).get("tokens_per_s")
        frac = row.get("fraction_of_limit")
        hf_s = f"{hf:.1f}" if hf else "-"
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
        frac_s = f"{frac:.0%}" if frac is not None else ""
        lines.append(f"{row['batch']:>5}  {row['zerostart']['tokens_per_s']:>10.1f}  {hf_s:>12}  {ratio:>6}  "
                     f"{row.get('same_tokens', '-'):>11}  {frac_s:>11}")
    lines.append(f"(bandwidth limit: {r['weight_bytes'] / 1e6:.0f} MB of weights per token at "
                 f"{r['bandwidth_gbps']:.1f} GB/s copy bandwidth measured in this run)")
    cold = r.get("cold_start") or {}
    if cold:
        n = len(next(iter(cold.values()))["runs"])
        lines.append(f"cold start: process spawn to first token, seconds, median of {n}")
        lines.append(f"{'':<13}" + "".join(f"{c:>12}" for c in COLD_COLUMNS + ("total",)))
        for name, d in cold.items():
            med = d["median"]
            lines.append(f"{name:<13}" + "".join(f"{med[c]:>12.3f}" for c in COLD_COLUMNS + ("total",)))
    return "\n".join(lines)
