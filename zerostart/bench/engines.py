"""``zerostart bench engines``: one model, one run, every engine's cold start and hot speed.

    zerostart bench engines --model DIR --vllm-python .venvs/vllm/bin/python [--repeat 1]
                            [--rungs source,image,standby,parked] [--json FILE]

Rows, interleaved round by round (the model's files evicted from the page cache before each cold start):

- zerostart's engine from each rung of the ladder (``zerostart coldstart``'s runs: a real
  worker process answering a real completion);
- vLLM's CPU build as its users start it: eager (``--enforce-eager``) and compiled (its
  default), with its default loader; and eager with zerostart's loader (``--load-format
  zerostart``);

each timed from the spawn (or the hand-over, or the wake) to the first token of the same
request, with its phases. Then, per engine, hot tokens/s at batch 1 and 16: the same
``/v1/completions`` requests (128 tokens each, ``ignore_eos``) to a hot server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

from zerostart.bench._env import log as _log

VLLM_ROWS = {  # row -> (mode, load format)
    "vllm eager": ("eager", "auto"),
    "vllm compiled": ("compiled", "auto"),
    "vllm eager + zerostart loader": ("eager", "zerostart"),
}
BATCHES = (1, 16)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face-layout checkpoint directory both engines load")
    p.add_argument("--vllm-python", required=True, help="the Python of vLLM's environment (make vllm-env)")
    p.add_argument("--rungs", default="source,image,standby,parked", help="zerostart rungs (comma-separated)")
    p.add_argument("--vllm", default=",".join(VLLM_ROWS), help="vLLM rows (comma-separated)")
    p.add_argument("--repeat", type=int, default=1, help="rounds (medians reported)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per hot request (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", help="zerostart's weights dtype (vLLM keeps the checkpoint's)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", metavar="FILE")


def main(args: argparse.Namespace) -> int:
    from zerostart import weights
    from zerostart.bench import _ceilings, _peers
    from zerostart.bench._coldstart_runs import RUNNERS, ensure_image

    args.page_cache = "model"  # the rungs' runners evict the files each start reads (coldstart.PAGE_CACHE)
    rungs = [r for r in args.rungs.split(",") if r]
    rows = [r for r in args.vllm.split(",") if r]
    files = [h.path for h in weights.resolve(args.model).headers]
    image = ensure_image(args.model, args.model, args) if any(r in ("image", "standby", "parked") for r in rungs) else None
    image_files = [os.path.join(image, "model.safetensors")] if image else []
    runs: dict[str, list[dict[str, Any]]] = {**{f"zerostart {r}": [] for r in rungs}, **{r: [] for r in rows}}
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
            try:
                run = _peers.vllm_cold_start(args.vllm_python, args.model, mode=mode, loader=loader,
                                             prompt_tokens=args.prompt_tokens, timeout=args.timeout,
                                             hot_batches=BATCHES if rnd == 0 and loader == "auto" else (),
                                             max_tokens=args.max_tokens)
            except RuntimeError as e:
                run = {"error": str(e)}
            runs[row].append(run)
            _log(f"  {row:<30} " + (f"first token after {run['total_s']:.2f} s" if "error" not in run
                                     else f"FAILED: {run['error']}"))
    hot = {"zerostart": _zerostart_hot(args)}
    report = {"model": args.model, "device": args.device, "uptime_load": [load, os.getloadavg()],
              "max_tokens": args.max_tokens, "runs": runs, "hot": hot, "rows": _summarize(runs, hot)}
    print(_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        _log(f"wrote {args.json}")
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


def _zerostart_hot(args) -> dict[str, float]:
    """zerostart's engine, hot, through its worker's OpenAI route: tokens/s at each batch."""
    from zerostart.bench import _peers
    from zerostart.bench._coldstart_runs import _Worker

    w = _Worker(args.model, args, images="off")
    try:
        w.wait_ready()
        return {str(b): _peers.hot_tokens_per_s(w.url, b, args.max_tokens, args.prompt_tokens) for b in BATCHES}
    finally:
        w.close()


def _summarize(runs: dict[str, list[dict[str, Any]]], hot: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
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
        engine_hot = hot.get("zerostart") if name.startswith("zerostart") else next(
            (r["hot"] for r in ok if r.get("hot")), None)
        rows.append({"row": name, "first_token_s": statistics.median(r["total_s"] for r in ok),
                     "phases": {k: statistics.median(v) for k, v in phases.items()},
                     "hot_tok_s": engine_hot or {}})
    return rows


def _table(rep: dict[str, Any]) -> str:
    lines = [f"{rep['model']} on {rep['device']}: seconds to the first token from a cold start (phases), and hot "
             f"tokens/s ({rep['max_tokens']} tokens per request); load {rep['uptime_load'][0][0]:.1f}",
             f"{'':<32} {'first token s':>13} {'tok/s b=1':>10} {'tok/s b=16':>11}  phases (s)"]
    for row in rep["rows"]:
        if "error" in row:
            lines.append(f"{row['row']:<32} FAILED: {row['error'][:80]}")
            continue
        h = row["hot_tok_s"]
        b1, b16 = (f"{h[k]:.1f}" if k in h else "" for k in ("1", "16"))
        phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases"].items())
        lines.append(f"{row['row']:<32} {row['first_token_s']:>13.2f} {b1:>10} {b16:>11}  {phases}")
    return "\n".join(lines)
