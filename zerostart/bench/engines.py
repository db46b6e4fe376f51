"""``zerostart bench engines``: one model, one run, every engine's cold start and hot speed.

    zerostart bench engines --model DIR [--vllm-python .venvs/vllm/bin/python]
                            [--gguf FILE.gguf ...] [--llama-server PATH] [--threads 1,2]
                            [--rungs source,image,standby,parked] [--repeat 1] [--json FILE]

Cold rows, interleaved round by round, each timed to the first token of the same request (16
prompt tokens, one token out) with its phases:

- zerostart's engine from each rung of the ladder (``zerostart coldstart``'s runs: a real
  worker process answering a real completion; the model's files evicted from the page cache
  before each start, and nothing else: torch's libraries stay cached);
- vLLM's CPU build as its users start it: eager (``--enforce-eager``) and compiled (its
  default), with its default loader; and eager with zerostart's loader (``--load-format
  zerostart``) (with ``--vllm-python``);
- llama.cpp's ``llama-server`` on each ``--gguf`` file from each of its rungs
  (``_llamacpp_runs``: source, image = the GGUF in the page cache, hot, its own idle sleep, its
  router's ``/models/load``, SIGSTOP/SIGCONT), with what its process held on each.

Then hot rows, one per engine, weights and thread count: tokens/s at batch 1 and 16 (the same
``/v1/completions`` requests, 128 tokens each, ``ignore_eos``) and what the engine's processes
held after them (proportional set size). zerostart and llama.cpp run with each ``--threads``
count; vLLM with its own choice. A row is ``HotRow(engine, weights, threads)``: an engine that
can hold the same model at another precision (zerostart with quantized weights beside llama.cpp's
Q4_1, Q8_0 and F16 files) adds its rows to :func:`hot_rows` and its runner to ``HOT``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from zerostart import weights
from zerostart.bench import _ceilings, _llamacpp_runs, _peers
from zerostart.bench._coldstart_runs import RUNNERS, _Worker, ensure_image
from zerostart.bench._env import log as _log
from zerostart.serve.backends import find_llama_server as find_server

VLLM_ROWS = {  # row -> (mode, load format)
    "vllm eager": ("eager", "auto"),
    "vllm compiled": ("compiled", "auto"),
    "vllm eager + zerostart loader": ("eager", "zerostart"),
}
LLAMACPP_RUNGS = ("source", "image", "hot", "sleep", "router", "sigstop")
BATCHES = (1, 16)


@dataclass(frozen=True)
class HotRow:
    """One hot measurement: an engine holding the model's weights in one format, with a thread
    count (None: the engine's own choice)."""

    engine: str  # a key of HOT
    weights: str  # what it holds: bf16, Q4_1 ... (a label)
    threads: int | None
    source: str  # the checkpoint directory or GGUF file it loads

    @property
    def label(self) -> str:
        return f"{self.engine} {self.weights}" + (f" t{self.threads}" if self.threads else "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face-layout checkpoint directory (zerostart, vLLM)")
    p.add_argument("--vllm-python", help="the Python of vLLM's environment (make vllm-env); none: no vLLM rows")
    p.add_argument("--gguf", action="append", default=[], metavar="FILE",
                   help="a GGUF file of the same model for llama.cpp's rows (repeatable: one per quantization)")
    p.add_argument("--llama-server", help="llama-server (default: .venvs/llamacpp/bin/llama-server, else PATH)")
    p.add_argument("--llamacpp-rungs", default=",".join(LLAMACPP_RUNGS), help="llama.cpp rungs (comma-separated)")
    p.add_argument("--threads", default="1,2", help="CPU threads of the hot rows, comma-separated (zerostart and "
                   "llama.cpp; the largest also for llama.cpp's cold rows)")
    p.add_argument("--rungs", default="source,image,standby,parked", help="zerostart rungs (comma-separated)")
    p.add_argument("--vllm", default=",".join(VLLM_ROWS), help="vLLM rows (comma-separated)")
    p.add_argument("--repeat", type=int, default=1, help="rounds (medians reported)")
    p.add_argument("--no-hot", dest="hot", action="store_false", help="cold rows only")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per hot request (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", help="zerostart's weights dtype (vLLM keeps the checkpoint's)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--llamacpp-coldstart", metavar="FILE",
                   help="write llama.cpp's source and image medians (first --gguf) in the format `zerostart simulate "
                        "--coldstart` and `replay --coldstart` price its rungs with")


def main(args: argparse.Namespace) -> int:
    rungs = [r for r in args.rungs.split(",") if r]
    rows = [r for r in args.vllm.split(",") if r] if args.vllm_python else []
    llama_rungs = [r for r in args.llamacpp_rungs.split(",") if r] if args.gguf else []
    threads = sorted({int(t) for t in args.threads.split(",") if t})
    server = _llama_server(args) if args.gguf else ""
    files = [h.path for h in weights.resolve(args.model).headers]
    image = ensure_image(args.model, args.model, args) if any(r in ("image", "standby", "parked") for r in rungs) else None
    image_files = [os.path.join(image, "model.safetensors")] if image else []
    runs: dict[str, list[dict[str, Any]]] = {
        **{f"zerostart {r}": [] for r in rungs}, **{r: [] for r in rows},
        **{f"llama.cpp {_quant(g)} {r}": [] for g in args.gguf for r in llama_rungs}}
    args.page_cache = "model"  # the rungs' runners evict the files each start reads (coldstart.PAGE_CACHE)
    load = os.getloadavg()
    for rnd in range(args.repeat):
        _log(f"round {rnd + 1}/{args.repeat}")
        for rung in rungs:
            run = RUNNERS[rung](args.model, image, args, files if rung == "source" else image_files)
            runs[f"zerostart {rung}"].append(run)
            _log(f"  zerostart {rung:<10} first token after {run['total_s']:.2f} s")
        for row in rows:
            mode, loader = VLLM_ROWS[row]
            _ceilings.drop(files)
            runs[row].append(_attempt(row, partial(
                _peers.vllm_cold_start, args.vllm_python, args.model, mode=mode, loader=loader,
                prompt_tokens=args.prompt_tokens, timeout=args.timeout)))
        for gguf in args.gguf:
            for rung in llama_rungs:
                row = f"llama.cpp {_quant(gguf)} {rung}"
                runs[row].append(_attempt(row, partial(
                    _llamacpp_runs.run, rung, server, gguf, threads=max(threads), prompt_tokens=args.prompt_tokens,
                    timeout=args.timeout)))
    hot = {r.label: _attempt(r.label, partial(HOT[r.engine], r, args, server))
           for r in (hot_rows(args, threads) if args.hot else [])}
    report = {"model": args.model, "gguf": args.gguf, "device": args.device, "threads": threads,
              "uptime_load": [load, os.getloadavg()], "max_tokens": args.max_tokens, "runs": runs, "hot": hot,
              "rows": _summarize(runs)}
    print(_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        _log(f"wrote {args.json}")
    if args.llamacpp_coldstart and args.gguf:
        with open(args.llamacpp_coldstart, "w") as f:
            json.dump(_telemetry(args.gguf[0], report["rows"]), f, indent=2)
        _log(f"wrote {args.llamacpp_coldstart}")
    ok = all("error" not in r for rs in runs.values() for r in rs) and all("error" not in h for h in hot.values())
    return 0 if ok else 1


def _llama_server(args: argparse.Namespace) -> str:
    server = find_server(args.llama_server)
    if server is None or not os.access(server, os.X_OK):
        raise SystemExit("zerostart: error: no llama-server (make llamacpp-env, or --llama-server PATH)")
    return server


def _quant(gguf: str) -> str:
    """A GGUF file's weights format, from its name (``...Q4_1.gguf`` -> ``Q4_1``)."""
    stem = os.path.basename(gguf).removesuffix(".gguf")
    return stem.rsplit(".", 1)[-1] if "." in stem else stem.rsplit("-", 1)[-1]


def _attempt(row: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        run = measure()
    except RuntimeError as e:
        _log(f"  {row:<34} FAILED: {e}")
        return {"error": str(e)}
    if "total_s" in run:
        _log(f"  {row:<34} first token after {run['total_s']:.2f} s")
    return run


# -- hot rows --------------------------------------------------------------------------------


def hot_rows(args: argparse.Namespace, threads: list[int]) -> list[HotRow]:
    rows = [HotRow("zerostart", args.dtype, t, args.model) for t in threads]
    rows += [HotRow("llama.cpp", _quant(g), t, g) for g in args.gguf for t in threads]
    if args.vllm_python:
        rows.append(HotRow("vllm", "checkpoint", None, args.model))
    return rows


def _zerostart_hot(row: HotRow, args: argparse.Namespace, server: str) -> dict[str, Any]:
    """zerostart's engine, hot, through its worker's OpenAI route."""
    w = _Worker(row.source, args, images="off", threads=row.threads)
    try:
        w.wait_ready()
        tok_s = {str(b): _peers.hot_tokens_per_s(w.url, b, args.max_tokens, args.prompt_tokens) for b in BATCHES}
        return {"tok_s": tok_s, "held_bytes": _peers.tree_bytes(w.proc.pid)}
    finally:
        w.close()


def _llamacpp_hot(row: HotRow, args: argparse.Namespace, server: str) -> dict[str, Any]:
    assert row.threads is not None
    return _llamacpp_runs.hot(server, row.source, threads=row.threads, batches=BATCHES, max_tokens=args.max_tokens,
                              prompt_tokens=args.prompt_tokens, timeout=args.timeout)


def _vllm_hot(row: HotRow, args: argparse.Namespace, server: str) -> dict[str, Any]:
    run = _peers.vllm_cold_start(args.vllm_python, row.source, mode="eager", loader="auto",
                                 prompt_tokens=args.prompt_tokens, timeout=args.timeout, hot_batches=BATCHES,
                                 max_tokens=args.max_tokens)
    return {"tok_s": run["hot"], "held_bytes": run["held_bytes"]}


HOT: dict[str, Callable[[HotRow, argparse.Namespace, str], dict[str, Any]]] = {
    "zerostart": _zerostart_hot, "llama.cpp": _llamacpp_hot, "vllm": _vllm_hot}


# -- report ----------------------------------------------------------------------------------


def _summarize(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append({"row": name, "error": rs[0]["error"] if rs else "not run"})
            continue
        phases: dict[str, list[float]] = {}
        for r in ok:
            for p in r["timeline"]["phases"]:
                phases.setdefault(p["name"], []).append(p["seconds"])
        row = {"row": name, "first_token_s": statistics.median(r["total_s"] for r in ok),
               "phases": {k: statistics.median(v) for k, v in phases.items()}}
        for key in ("held_bytes", "resting_bytes", "hot_bytes"):
            if all(key in r for r in ok):
                row[key] = int(statistics.median(r[key] for r in ok))
        rows.append(row)
    return rows


def _telemetry(gguf: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """llama.cpp's wake times as ``zerostart coldstart --json`` writes zerostart's: from disk
    (``source``) and from the page cache (``image``)."""
    medians = {r["row"].rsplit(" ", 1)[1]: r["first_token_s"] for r in rows
               if r["row"].startswith(f"llama.cpp {_quant(gguf)} ") and "error" not in r}
    return {"model": os.path.basename(gguf).removesuffix(".gguf"), "bytes": os.path.getsize(gguf), "engine": "llama.cpp",
            "rungs": {k: {"median_s": medians[k]} for k in ("source", "image") if k in medians}}


def _mib(n: int | None) -> str:
    return f"{n / 2**20:.0f}" if n is not None else ""


def _table(rep: dict[str, Any]) -> str:
    lines = [f"{rep['model']} on {rep['device']}: seconds to the first token from each rung (phases), and what the "
             f"server held (MiB, proportional set size); load {rep['uptime_load'][0][0]:.1f}",
             f"{'':<36} {'first token s':>13} {'held':>6} {'resting':>8}  phases (s)"]
    for row in rep["rows"]:
        if "error" in row:
            lines.append(f"{row['row']:<36} FAILED: {row['error'][:80]}")
            continue
        phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases"].items())
        lines.append(f"{row['row']:<36} {row['first_token_s']:>13.3f} {_mib(row.get('held_bytes')):>6} "
                     f"{_mib(row.get('resting_bytes')):>8}  {phases}")
    lines += ["", f"hot: generated tokens/s ({rep['max_tokens']} tokens per request, ignore_eos) and what the engine "
                  "held after them (MiB)",
              f"{'':<36} {'tok/s b=1':>10} {'tok/s b=16':>11} {'held':>6}"]
    for label, h in rep["hot"].items():
        if "error" in h:
            lines.append(f"{label:<36} FAILED: {h['error'][:80]}")
            continue
        b1, b16 = (f"{h['tok_s'][k]:.1f}" if k in h["tok_s"] else "" for k in ("1", "16"))
        lines.append(f"{label:<36} {b1:>10} {b16:>11} {_mib(h.get('held_bytes')):>6}")
    return "\n".join(lines)
