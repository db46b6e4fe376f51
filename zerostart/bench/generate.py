"""``zerostart bench generate``: generation speed and cold start against transformers, in one run.

Throughput: greedy generation of ``--max-tokens`` tokens after a ``--prompt-tokens`` prompt, at
each batch size and dtype, zerostart (continuous batching engine) and transformers' ``generate``
on the same model and device; every contestant of every dtype interleaved round by round (a
busy neighbour slows them all alike), medians over ``--repeat``. tokens/s counts
generated tokens over the whole wall time (prefill included). Every run must produce exactly
the requested tokens per sequence (end-of-sequence is ignored by both), so nobody wins by
stopping early. Each row also gives the fraction of the memory-bandwidth limit: a decode step
reads every weight once, so ``batch × copy bandwidth / weight bytes`` tokens/s is the most any
engine can decode (KV cache reads, small at these lengths, are not counted against it).
Prefill: one ``--prefill-tokens`` prompt through the model (its logits), tokens/s.

Cold start: fresh processes from spawn to the first generated token (``_generate_cold.py``).

Scheduling (``_chunked.py``): the ATen calls of a batch-1 decode step; with ``--long-tokens``, a
short chat request's first token behind a long prompt; with ``--chunks``, prefill speed and the
longest step for each prefill chunk size. ``--engine-defaults`` runs everything with the
engine's default settings (context, sequences, KV budget), as a server would.

Before and after (``_baseline.py``): with ``--baseline DIR`` the decode, prefill and ATen-call
measurements also run with another checkout's code and this one's, turn by turn in fresh
processes.

    zerostart bench generate                                   # SmolLM2-135M-Instruct, the default dtype
    zerostart bench generate --dtype float32,bfloat16 --json bench/results/cpu-generate.json
    zerostart bench generate --size 1b --device cuda           # a random 1B model
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # the child's first statement (cold-start runs)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402
from zerostart import weights  # noqa: E402
from zerostart import engine  # noqa: E402
from zerostart.bench import _baseline, _chunked, _generate_cold  # noqa: E402
from zerostart.bench._engine_run import bandwidth as _bandwidth, demo_model as _demo, machine as _machine  # noqa: E402
from zerostart.bench._engine_run import prompts, sync, timed_batch  # noqa: E402
from zerostart.bench._env import log as _log  # noqa: E402
from zerostart.engine import SamplingParams  # noqa: E402
from zerostart.names import dtype_name  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="model directory, GGUF file or source (default: a demo model)")
    parser.add_argument("--size", default="smollm2", choices=("smollm2", "tiny", "small", "1b"),
                        help="demo model when --model is not given: smollm2 (SmolLM2-135M-Instruct, bfloat16), or "
                             "a random-weights model of that size (default: smollm2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated dtypes to measure, e.g. float32,bfloat16 (default: the engine's default)")
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes (default: 1,16)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default: 32)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill run (default: 512)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per sequence (default: 128)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per contestant and batch (default: 5)")
    parser.add_argument("--cold-repeat", type=int, default=3, help="cold-start processes per contestant (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both (default: torch's)")
    parser.add_argument("--no-transformers", action="store_true", help="time zerostart alone")
    parser.add_argument("--cuda-graphs", choices=("on", "off"), default="on", help="decode CUDA graphs (default: on)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--engine-defaults", action="store_true",
                        help="the engine's default max_model_len, max_num_seqs and KV budget (default: just what the "
                             "runs need)")
    parser.add_argument("--long-tokens", type=int, default=0,
                        help="time a short request arriving while a prompt this long is prefilled (default: 0, off)")
    parser.add_argument("--chunks", default="", help="comma-separated prefill chunk sizes to compare (default: none)")
    parser.add_argument("--chunk-tokens", type=int, default=2048, help="prompt length of the chunk comparison")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure another zerostart checkout (e.g. main's) against this one, turn by turn")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--child", choices=("zerostart", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.child:
        return _generate_cold.child(args, _T_START)
    if args.repeat < 1 or args.cold_repeat < 0 or args.max_tokens < 2 or args.prompt_tokens < 1:
        raise SystemExit("zerostart: error: --repeat >= 1, --cold-repeat >= 0, --max-tokens >= 2, --prompt-tokens >= 1")
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"zerostart: error: --batch must list integers (got {args.batch!r})") from None
    if args.threads:
        # torch only when the benchmark runs, not at the command's start
        import torch

        torch.set_num_threads(args.threads)
    model = args.model or _demo(args.size)
    dtypes = _dtypes(args, model)
    result: dict[str, Any] = {"model": os.path.abspath(model) if os.path.exists(model) else model, "device": args.device,
                              "machine": _machine(), "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                              "prefill_tokens": args.prefill_tokens, "repeat": args.repeat, "dtypes": dtypes}
    _log(f"model {model} on {args.device}, dtypes {', '.join(dtypes)}")
    result["bandwidth_gbps"] = _bandwidth(args.device)
    setups = _setups(args, model, dtypes, max(batches))
    result["weight_bytes"] = {s.dtype: s.weight_bytes for s in setups}
    result["throughput"] = _throughput(args, setups, batches, result["bandwidth_gbps"])
    result["prefill"] = _prefill(args, setups)
    result["kv"] = {s.dtype: dataclasses.asdict(s.engine.kv_stats()) for s in setups}
    result["ops_per_token"] = {s.dtype: _chunked.ops_per_token(s.engine) for s in setups}
    if args.long_tokens:
        e = setups[0].engine
        ids = prompts(e.model_config.vocab_size, 1, args.long_tokens, e.tokenizer.bos_token_id)[0]
        result["behind_long"] = _chunked.behind_long(e, ids, args.repeat, args.device)
    for s in setups:
        s.engine.stop()
    if args.chunks:
        e = setups[0].engine
        ids = prompts(e.model_config.vocab_size, 1, args.chunk_tokens, e.tokenizer.bos_token_id)[0]
        result["chunks"] = _chunked.chunk_sweep(model, setups[0].dtype, [int(c) for c in args.chunks.split(",")], ids,
                                                args.repeat, args.device, e.config)
    setups.clear()
    if args.baseline:
        result["baseline"] = _baseline.run(args, model, dtypes, args.baseline, result["bandwidth_gbps"])
    result["cold_start"] = _generate_cold.run(args, model, dtypes) if args.cold_repeat else {}
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    print(_table(result))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.json)
        _log(f"wrote {args.json}")
    return 0


def _dtypes(args, model: str) -> list[str]:
    if args.dtype:
        return [dtype_name(d) for d in args.dtype.split(",") if d.strip()]
    return [str(engine.weights_dtype(weights.localize(model), args.device)).removeprefix("torch.")]


# -- throughput ------------------------------------------------------------------------------

def _transformers(model_path: str, dtype, device: str):
    # the transformers peer: only when it is measured
    import transformers

    gguf = weights.gguf_file(model_path) if os.path.exists(model_path) else None
    if gguf is not None:  # transformers dequantizes GGUF files itself
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                               dtype=dtype)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(weights.localize(model_path), dtype=dtype)
    hf = hf.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to() reads as unbound to mypy
    hf.generation_config.eos_token_id = None  # run every sequence to max_tokens, like ignore_eos
    hf.generation_config.pad_token_id = 0
    return hf


@dataclass
class _Setup:
    """One dtype's contestants: zerostart's engine and transformers' model of the same weights."""

    dtype: str
    engine: Any
    hf: Any
    weight_bytes: int


def _setups(args, model_path: str, dtypes: list[str], max_seqs: int) -> list[_Setup]:
    # the engine's torch names: only when the benchmark runs, not at the command's start
    from zerostart.engine import Engine, EngineConfig

    max_len = max(args.prompt_tokens + args.max_tokens, args.prefill_tokens, args.long_tokens, args.chunk_tokens) + 8
    cfg = EngineConfig(cuda_graphs=args.cuda_graphs == "on", compile=args.compile)
    if not args.engine_defaults:
        cfg = dataclasses.replace(cfg, max_model_len=max_len, max_num_seqs=max_seqs)
    out = []
    for dtype in dtypes:
        engine = Engine.from_pretrained(model_path, device=args.device, dtype=dtype, config=cfg)
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        hf = None if args.no_transformers else _transformers(model_path, engine.dtype, args.device)
        out.append(_Setup(dtype, engine, hf, weight_bytes))
    return out


def _throughput(args, setups: list[_Setup], batches: list[int], bw: float) -> list[dict[str, Any]]:
    """A row per dtype and batch size; every contestant of every dtype interleaved in each round,
    so that a busy neighbour slows them all alike."""
    rows = []
    for batch in batches:
        contestants = []
        for s in setups:
            ps = prompts(s.engine.model_config.vocab_size, batch, args.prompt_tokens, s.engine.tokenizer.bos_token_id)
            contestants.append((("zerostart", s.dtype), _zs_run(args, s.engine, ps)))
            if s.hf is not None:
                contestants.append((("transformers", s.dtype), _hf_run(args, s.hf, ps)))
        times, outputs = _interleaved(args, contestants)
        for s in setups:
            row: dict[str, Any] = {"dtype": s.dtype, "batch": batch}
            for (name, dtype), ts in times.items():
                if dtype == s.dtype:
                    med = statistics.median(ts)
                    row[name] = {"seconds": ts, "median_s": med, "tokens_per_s": batch * args.max_tokens / med}
            if s.hf is not None:
                row["ratio"] = row["zerostart"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
                same = sum(a == b for a, b in zip(outputs[("zerostart", s.dtype)], outputs[("transformers", s.dtype)]))
                row["same_tokens"] = f"{same}/{batch}"
            row["limit_tokens_per_s"] = batch * bw * 1e9 / s.weight_bytes
            row["fraction_of_limit"] = row["zerostart"]["tokens_per_s"] / row["limit_tokens_per_s"]
            rows.append(row)
            _log(f"{s.dtype} batch {batch}: zerostart {row['zerostart']['tokens_per_s']:.1f} tok/s"
                 + (f", transformers {row['transformers']['tokens_per_s']:.1f} tok/s" if s.hf is not None else ""))
    order = [s.dtype for s in setups]
    return sorted(rows, key=lambda r: (order.index(r["dtype"]), r["batch"]))


def _zs_run(args, engine, ps: list[list[int]]):
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    def run() -> tuple[float, list[list[int]]]:
        dt, events = timed_batch(engine, args.device, [(p, params) for p in ps])
        return dt, [[ev.token_id for ev in evs] for evs in events]

    return run


def _hf_run(args, hf, ps: list[list[int]]):
    # torch only when the benchmark runs, not at the command's start
    import torch

    def run() -> tuple[float, list[list[int]]]:
        ids = torch.tensor(ps, device=args.device)
        sync(args.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens, do_sample=False)
        sync(args.device)
        return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()

    return run


def _interleaved(args, contestants) -> tuple[dict[Any, list[float]], dict[Any, list[list[int]]]]:
    """A warm-up run each, then ``--repeat`` rounds of one run each; every run must produce
    exactly ``--max-tokens`` tokens per sequence."""
    times: dict[Any, list[float]] = {key: [] for key, _ in contestants}
    outputs: dict[Any, list[list[int]]] = {}
    for key, fn in contestants:
        _, outputs[key] = fn()
    for _ in range(args.repeat):
        for key, fn in contestants:
            dt, toks = fn()
            if any(len(t) != args.max_tokens for t in toks):
                raise RuntimeError(f"{key} generated {[len(t) for t in toks]} tokens, not {args.max_tokens} each")
            times[key].append(dt)
    return times, outputs


def _prefill(args, setups: list[_Setup]) -> list[dict[str, Any]]:
    """One long prompt through each model (every position's logits), tokens/s, all interleaved."""
    # torch only when the benchmark runs, not at the command's start
    import torch

    runs = []
    for s in setups:
        ids = prompts(s.engine.model_config.vocab_size, 1, args.prefill_tokens, s.engine.tokenizer.bos_token_id)[0]
        runs.append((("zerostart", s.dtype), lambda e=s.engine, x=ids: e.logits(x, chunk=len(x))))
        if s.hf is not None:
            runs.append((("transformers", s.dtype), lambda m=s.hf, x=ids: m(torch.tensor([x], device=args.device))))

    def timed(fn) -> float:
        sync(args.device)
        t = time.perf_counter()
        with torch.inference_mode():
            fn()
        sync(args.device)
        return time.perf_counter() - t

    for _, fn in runs:
        timed(fn)
    times: dict[Any, list[float]] = {key: [] for key, _ in runs}
    for _ in range(args.repeat):
        for key, fn in runs:
            times[key].append(timed(fn))
    out = []
    for s in setups:
        row: dict[str, Any] = {"dtype": s.dtype, "tokens": args.prefill_tokens}
        for (name, dtype), ts in times.items():
            if dtype == s.dtype:
                med = statistics.median(ts)
                row[name] = {"seconds": ts, "median_s": med, "tokens_per_s": args.prefill_tokens / med}
        if s.hf is not None:
            row["ratio"] = row["zerostart"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        _log(f"{s.dtype} prefill {args.prefill_tokens}: zerostart {row['zerostart']['tokens_per_s']:.0f} tok/s")
        out.append(row)
    return out


# -- report ----------------------------------------------------------------------------------

def _table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"zerostart bench generate: {os.path.basename(r['model'].rstrip('/'))} on {r['device']}, torch {m['torch']}, "
             f"transformers {m.get('transformers', '-')}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
             f"load average {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}" + (f", {m['gpu']}" if "gpu" in m else ""),
             f"throughput: greedy, prompt {r['prompt_tokens']} tokens, {r['max_tokens']} new tokens per sequence, "
             f"median of {r['repeat']} runs (tokens/s over the whole call, prefill included)",
             f"{'dtype':>9} {'batch':>5}  {'zerostart':>10}  {'transformers':>12}  {'ratio':>6}  {'same tokens':>11}  "
             f"{'bw limit':>9}  {'of limit':>8}"]
    for row in r["throughput"]:
        hf = row.get("transformers", {}).get("tokens_per_s")
        hf_s = f"{hf:.1f}" if hf else "-"
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
        lines.append(f"{row['dtype']:>9} {row['batch']:>5}  {row['zerostart']['tokens_per_s']:>10.1f}  "
                     f"{hf_s:>12}  {ratio:>6}  {row.get('same_tokens', '-'):>11}  "
                     f"{row['limit_tokens_per_s']:>9.0f}  {row['fraction_of_limit']:>8.0%}")
    lines.append(f"(bandwidth limit: batch x {r['bandwidth_gbps']:.1f} GB/s copy bandwidth measured in this run / the "
                 "weight bytes: " + ", ".join(f"{d} {b / 1e6:.0f} MB" for d, b in r["weight_bytes"].items()) + ")")
    lines.append(f"prefill: one {r['prefill_tokens']}-token prompt, tokens/s, median of {r['repeat']}")
    for p in r["prefill"]:
        hf = p.get("transformers", {}).get("tokens_per_s")
        hf_s = f"{hf:.0f}" if hf else "-"
        ratio = f"{p['ratio']:.2f}x" if "ratio" in p else "-"
        lines.append(f"{p['dtype']:>9}        {p['zerostart']['tokens_per_s']:>10.0f}  {hf_s:>12}  {ratio:>6}")
    for dtype, kv in r["kv"].items():
        lines.append(f"{dtype} KV cache: {kv['tokens']} tokens in {kv['blocks']} blocks of {kv['block_tokens']}, "
                     f"{kv['slots']} sequences at once, {kv['nbytes'] / 2**20:.0f} MiB"
                     + ("" if kv["paged"] else ", every slot backed in full"))
    lines += _chunked.table(r) + _baseline.table(r)
    cold = r.get("cold_start") or {}
    if cold:
        n = len(next(iter(next(iter(cold.values())).values()))["runs"])
        lines.append(f"cold start: process spawn to first token, seconds, median of {n}")
        lines.append(f"{'':<22}" + "".join(f"{c:>12}" for c in _generate_cold.COLD_COLUMNS + ("total",)))
        for dtype, by_name in cold.items():
            for name, d in by_name.items():
                med = d["median"]
                lines.append(f"{name + ' ' + dtype:<22}" + "".join(f"{med[c]:>12.3f}" for c in _generate_cold.COLD_COLUMNS + ("total",)))
    return "\n".join(lines)
