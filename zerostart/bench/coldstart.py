"""``zerostart coldstart``: real cold starts of a model from each rung of the cold ladder.

    zerostart coldstart --model PATH [--from source|image|standby|reserve|parked ...] [--repeat N]
                        [--device cpu|cuda] [--page-cache model|machine|warm] [--json FILE] [--chart FILE.png]

Each start is a real worker process (the one the server runs) answering a real completion:

- source   spawn a worker on the checkpoint
- image    spawn a worker on the model's ready image (written once, untimed)
- standby  hand the model (its image) to a spare worker that already imported torch and
           initialized the device (the spare's own start is not timed: it happened earlier)
- reserve  the same, with a spare that also faulted in host memory for the arena while it
           waited (CPU; ``server.standby_reserve``), so the image is read into memory in place
- parked   wake a worker whose weights were parked in host RAM

and the clock stops at the first token of a completion request. Before each start the files it
reads are made cold as ``--page-cache`` says (:data:`PAGE_CACHE`): by default only the model's
own files (checkpoint or image) are evicted, which needs no root and leaves every other
process's cache alone; ``machine`` drops the whole machine's page cache as root (torch's
libraries too, as after a reboot); ``warm`` leaves it alone, as on a server that has been
running, whose wake times a trace replay predicts with (``zerostart replay --coldstart``).
Phases come from the worker's own timeline (spawn, import, device_init, read, copy, prepare,
warmup, wake) plus the gateway-side first token, on one clock. The table prints, for the
phases that move bytes, GB/s against the ceiling measured in the same run (direct-I/O cold reads
of the same files for source/image/standby, memcpy or pinned host->device for parked), and for
each rung its floor: bytes / ceiling plus the fixed costs that rung cannot skip.
"""


from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

from zerostart import weights
from zerostart.bench import _ceilings
from zerostart.bench._coldstart_runs import RUNNERS, ensure_image
from zerostart.bench._env import log as _log

RUNGS = ["source", "image", "standby", "reserve", "parked"]
LABELS = {"source": "source", "image": "image", "standby": "standby+image", "reserve": "standby+reserve",
          "parked": "parked"}
# --page-cache: what is made cold before each start (and before the ceilings are measured)
PAGE_CACHE = {
    "model": "evict only the files the start reads (checkpoint or image) from the page cache: no root needed, "
             "other processes' cached files stay (torch's libraries too, so import is warm)",
    "machine": "drop the whole machine's page cache (/proc/sys/vm/drop_caches, root only): every file of every "
               "process is read from disk again, torch's libraries included; slows everything else on the machine",
    "warm": "leave the page cache alone, as on a server that has been running",
}
PHASE_ORDER = ["spawn", "import", "device_init", "read", "copy", "prepare", "warmup", "wake", "first_token"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or source (hf://, s3://, https://)")
    p.add_argument("--from", dest="rungs", action="append", choices=RUNGS,
                   help="rung(s) to start from (repeatable; default all)")
    p.add_argument("--repeat", type=int, default=3, help="cold starts per rung (default 3; medians reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", help="weights dtype (default: the engine's default for the device)")
    p.add_argument("--page-cache", choices=list(PAGE_CACHE), default="model",
                   help="what is made cold before each start: " + "; ".join(f"{k}: {v}" for k, v in PAGE_CACHE.items())
                   + " (default: model)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="length of the first request's prompt (default 16)")
    p.add_argument("--json", metavar="FILE", help="write every run and the medians (the format `simulate --coldstart` reads)")
    p.add_argument("--chart", metavar="FILE.png", help="draw a phase timeline per rung")
    p.add_argument("--timeout", type=float, default=600, help="seconds a single start may take (default 600)")


def main(args: argparse.Namespace) -> int:
    rungs = args.rungs or RUNGS
    if args.repeat < 1:
        raise SystemExit("zerostart: error: --repeat must be at least 1")
    if args.page_cache == "machine" and os.geteuid() != 0:
        raise SystemExit("zerostart: error: --page-cache machine drops the whole machine's page cache, which needs "
                         "root; --page-cache model (the default) evicts only the model's files and needs none")
    model = args.model
    ck = weights.open_source(model)  # resolves (and for remote sources, lists) without loading
    if ck.gguf is not None:  # the stored (quantized) bytes are what a load from the source reads
        files, model_bytes = [ck.gguf.path], ck.gguf.nbytes
    else:
        files, model_bytes = [h.path for h in ck.checkpoint.headers], ck.checkpoint.nbytes
    ck.finish(False)
    model_dir = weights.localize(model)
    _log(f"coldstart: {model}: {model_bytes / 1e9:.2f} GB, device {args.device}, rungs {', '.join(rungs)}")

    image = None
    if any(r in ("image", "standby", "reserve") for r in rungs):
        image = ensure_image(model, model_dir, args)
    image_files = [os.path.join(image, "model.safetensors")] if image else []

    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in rungs}
    ceilings: dict[str, list[float]] = {}
    local_files = [f for f in files if os.path.exists(f)]
    for rnd in range(args.repeat):
        _log(f"round {rnd + 1}/{args.repeat}")
        cold = args.page_cache != "warm" and bool(local_files or image_files)
        for k, v in _ceilings.measure(local_files or image_files, args.device, cold=cold).items():
            ceilings.setdefault(k, []).append(v)
        for rung in rungs:
            try:
                run = RUNNERS[rung](model, image, args, local_files if rung == "source" else image_files)
            except RuntimeError as e:
                run = {"rung": rung, "error": str(e)}
            run["round"] = rnd
            runs[rung].append(run)
            if "error" in run:
                _log(f"  {LABELS[rung]:<16} FAILED: {run['error']}")
            else:
                _log(f"  {LABELS[rung]:<16} first token after {run['total_s']:.3f} s")

    report = _summarize(model, model_bytes, args.device, runs, ceilings, image)
    report["page_cache"] = args.page_cache
    print(_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        _log(f"wrote {args.json}")
    if args.chart:
        _chart(report, args.chart)
        _log(f"wrote {args.chart}")
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


def _summarize(model: str, model_bytes: int, device: str, runs: dict, ceilings: dict, image: str | None) -> dict:
    med_ceil = {k: statistics.median(v) for k, v in ceilings.items() if v}
    rungs: dict[str, Any] = {}
    for rung, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rungs[rung] = {"label": LABELS[rung], "error": rs[0].get("error") if rs else "no runs"}
            continue
        phases: dict[str, list[dict]] = {}
        for r in ok:
            for p in r["timeline"]["phases"]:
                phases.setdefault(p["name"], []).append(p)
        med = {name: {"seconds": statistics.median(p["seconds"] for p in ps),
                      "start_s": statistics.median(p["start_s"] for p in ps),
                      "bytes": max(p.get("bytes", 0) for p in ps)} for name, ps in phases.items()}
        for name, m in med.items():
            if m["bytes"] and m["seconds"] > 0 and name in ("read", "copy", "wake"):
                m["gbps"] = m["bytes"] / m["seconds"] / 1e9
                ceiling = _ceiling_for(name, rung, device, med_ceil)
                if ceiling:
                    m["of_ceiling"] = m["gbps"] / ceiling
                    m["ceiling_gbps"] = ceiling
        total = statistics.median(r["total_s"] for r in ok)
        fixed = sum(med[n]["seconds"] for n in ("spawn", "import", "device_init") if n in med)
        bw = _ceiling_for("wake" if rung == "parked" else "read", rung, device, med_ceil)
        moved = model_bytes if rung in ("source", "parked") else (med.get("read", {}).get("bytes") or model_bytes)
        floor = fixed + (moved / bw / 1e9 if bw else 0.0)
        rungs[rung] = {"label": LABELS[rung], "median_s": total, "runs": [r["total_s"] for r in ok], "phases": med,
                       "floor_s": floor, "of_floor": floor / total if total and floor else None, "timelines": [r["timeline"] for r in ok]}
    return {"model": model, "bytes": model_bytes, "device": device, "image": image, "ceilings_gbps": med_ceil,
            "ceilings_runs": ceilings, "rungs": rungs, "environment": _environment(device)}


def _ceiling_for(phase: str, rung: str, device: str, c: dict) -> float | None:
    if phase == "wake":  # on CPU a wake maps the parked file back: no byte moves, no ceiling applies
        return c.get("pinned_h2d") if device.startswith("cuda") else None
    if phase == "copy":
        return c.get("pinned_h2d")
    return c.get("cold_read") or c.get("warm_read")  # a --page-cache warm run measures no cold read


def _table(rep: dict) -> str:
    c = rep["ceilings_gbps"]
    mode = rep.get("page_cache", "model")
    lines = [f"zerostart coldstart: {rep['model']} ({rep['bytes'] / 1e9:.2f} GB), device {rep['device']}, medians",
             f"page cache: {mode} ({PAGE_CACHE.get(mode, '').split(':')[0]})"]
    parts = []
    if "cold_read" in c:
        parts.append(f"direct-I/O read of the same files {c['cold_read']:.2f} GB/s (into fresh memory "
                     f"{c.get('cold_fresh', 0):.2f} GB/s)")
    elif "warm_read" in c:
        parts.append(f"read of the same files from the page cache {c['warm_read']:.2f} GB/s")
    if "memcpy" in c:
        parts.append(f"memcpy {c['memcpy']:.2f} GB/s")
    if "pinned_h2d" in c:
        parts.append(f"pinned host->device {c['pinned_h2d']:.2f} GB/s")
    lines.append("ceilings: " + "; ".join(parts))
    present = [p for p in PHASE_ORDER if any(p in r.get("phases", {}) for r in rep["rungs"].values())]
    lines.append(f"{'':<16} {'phases (seconds; they may overlap)':<{12 * len(present) - 1}} {'first':>7} "
                 f"{'best':>9} {'reached':>8}")
    head = (f"{'rung':<16}" + "".join(f" {p:>11}" for p in present)
            + f" {'token s':>7} {'possible':>9} {'of best':>8}")
    lines += [head, "-" * len(head)]
    for r in rep["rungs"].values():
        if "error" in r:
            lines.append(f"{r['label']:<16} FAILED: {r['error'][:100]}")
            continue
        row = f"{r['label']:<16}"
        for p in present:
            m = r["phases"].get(p)
            row += f" {m['seconds']:>11.3f}" if m else f" {'-':>11}"
        reached = f"{r['of_floor'] * 100:>7.0f}%" if r.get("of_floor") else f"{'-':>8}"
        best = f"{r['floor_s']:>8.3f}s" if r["floor_s"] else f"{'-':>9}"  # (no ceiling applies: a CPU wake)
        row += f" {r['median_s']:>7.3f} {best} {reached}"
        lines.append(row)
    lines.append("best possible: the bytes the rung moves at the ceiling measured above, plus the fixed costs it pays "
                 "(spawn, import, device init); reached: best possible / first token (100% = at the limit)")
    moved = []
    for rung, r in rep["rungs"].items():
        for name in ("read", "copy", "wake"):
            m = r.get("phases", {}).get(name)
            if not (m and m.get("gbps")):
                continue
            line = f"  {r['label']:<16} {name:<5} {m['bytes'] / 1e9:6.2f} GB at {m['gbps']:6.2f} GB/s"
            if m.get("of_ceiling"):
                what = ("pinned host->device copy" if name in ("copy", "wake") else
                        "direct-I/O read of the same files" if "cold_read" in c else "page-cache read of the same files")
                line += f" = {m['of_ceiling'] * 100:.0f}% of a {what} ({m['ceiling_gbps']:.2f} GB/s)"
                if m["of_ceiling"] > 1.05 and name == "read":
                    line += (": faster than that read in this run (buffered reads with readahead can be; "
                             "on small files both are noise)")
            if name == "read" and c.get("cold_fresh") and rung != "parked":
                line += f"; {m['gbps'] / c['cold_fresh'] * 100:.0f}% of that read into fresh memory"
            if name == "wake" and not rep["device"].startswith("cuda"):
                line += " (the parked file mapped back in place: page tables filled, nothing copied)"
            moved.append(line)
    if moved:
        lines.append("bytes moved (medians):")
        lines += moved
    return "\n".join(lines)


def _chart(rep: dict, path: str) -> None:
    # matplotlib (optional): only for --chart
    import matplotlib

    matplotlib.use("Agg")
    # matplotlib (optional): only for --chart
    import matplotlib.pyplot as plt

    rungs = [r for r in rep["rungs"].values() if "error" not in r]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 1.1 * len(rungs) * 1.0))
    colors = dict(zip(PHASE_ORDER, plt.get_cmap("tab10").colors))  # type: ignore[attr-defined]  # a ListedColormap
    yticks, ylabels = [], []
    y = 0.0
    for r in reversed(rungs):
        order = sorted(range(len(r["runs"])), key=lambda i: r["runs"][i])
        tl = r["timelines"][order[len(order) // 2]]  # the run with the median total
        lanes = [p for p in PHASE_ORDER if any(x["name"] == p for x in tl["phases"])]
        for i, name in enumerate(lanes):
            for p in tl["phases"]:
                if p["name"] == name:
                    ax.barh(y + i * 0.8 / max(1, len(lanes)), p["end_s"] - p["start_s"], left=p["start_s"],
                            height=0.8 / max(1, len(lanes)), color=colors[name], align="edge",
                            label=name if name not in ax.get_legend_handles_labels()[1] else None)
        yticks.append(y + 0.4)
        ylabels.append(f"{r['label']}\n{r['median_s']:.2f} s")
        y += 1.2
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels)
    ax.set_xlabel("seconds from the request (spawn included where the rung pays it)")
    ax.set_title(f"cold start phases: {os.path.basename(rep['model'].rstrip('/'))} on {rep['device']}")
    ax.legend(loc="lower right", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _environment(device: str) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg": os.getloadavg()}
    try:
        # torch only when the benchmark runs, not at the command's start
        import torch

        env["torch"] = torch.__version__
        if device.startswith("cuda"):
            env["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return env
