"""``zerostart bench load``: weight loading against peers and the measured hardware limit.

    zerostart bench load [--model PATH | --size 2GB] [--device cpu|cuda] [--cold] [--repeat N] [--json FILE]

Every trial runs in a fresh process; contestants are interleaved (the order rotates each
round) and reported as medians. ``--cold`` evicts the checkpoint's files from the page cache
before every cold trial (``weights.evict_page_cache``: no root needed, no other file touched) and
adds a cold column. The ceilings are measured in the same run:
direct-I/O reads of the same files (cold), page-cache reads and memcpy (warm), and pinned
host-to-device copies (CUDA).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from zerostart import weights
from zerostart.bench import _ceilings, _checkpoint, _env, _s3
from zerostart.bench._contestants import CONTESTANTS, LABELS, available, prepare
from zerostart.bench._env import log as _log
from zerostart.units import parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH", help="a safetensors file or Hugging Face model directory")
    src.add_argument("--size", default="2GB", help="size of the generated Llama-shaped bf16 checkpoint (default 2GB)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--cold", action="store_true", help="also time cold loads (the files evicted from the page cache before each)")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="rounds of every contestant (default 3)")
    p.add_argument("--only", metavar="NAMES", help=f"comma-separated contestants (default all: {','.join(CONTESTANTS)})")
    p.add_argument("--threads", type=int, default=16, help="reader threads offered to peers that take a count (default 16)")
    p.add_argument("--json", metavar="FILE", help="write every trial, ceiling and median here")
    p.add_argument("--work-dir", metavar="DIR", help="where generated checkpoints live (default: the zerostart cache)")
    p.add_argument("--s3-loopback", action="store_true",
                   help="serve the checkpoint from a local S3 server (s3rver via npm, else moto) and race the "
                        "object-storage loaders against it")
    p.add_argument("--sweep", action="store_true",
                   help="instead of racing peers, time zerostart over a grid of threads x chunk sizes x strategies "
                        "(how the defaults were chosen)")


def main(args: argparse.Namespace) -> int:
    names = _contestants(args)

    work = args.work_dir or os.path.join(weights.cache_dir(), "bench")
    if (args.model and weights.is_remote(args.model)) or args.s3_loopback:
        return _object_storage(args, work)
    if args.model:
        path = args.model
        desc = path
    else:
        path = _checkpoint.ensure(work, parse_size(args.size), log=_log)
        desc = f"generated Llama-shaped bf16 checkpoint, {_checkpoint.describe(path)}"
    ckpt = weights.resolve(path)
    files = [h.path for h in ckpt.headers]
    model_bytes = ckpt.nbytes
    _log(f"bench load: {desc}: {model_bytes / 1e9:.2f} GB in {len(files)} file(s), device {args.device}")
    if args.sweep:
        return _sweep(path, files, model_bytes, args)

    runners, extras, skipped = _prepare(names, path, files, work, args.device)
    modes = ["cold", "warm"] if args.cold else ["warm"]
    trials, ceilings = _race(runners, extras, modes, path, files, args)

    report = _summarize(trials, ceilings, runners, modes, model_bytes, args.device)
    ref = report["reference_fingerprint"]
    bad = sorted({t["contestant"] for t in trials if ref and t.get("fingerprint") not in (None, ref)})
    report.update(model=path, model_description=desc, files=len(files), bytes=model_bytes, device=args.device,
                  repeat=args.repeat, page_cache="files evicted before each cold trial" if args.cold else None, skipped=skipped,
                  mismatched=bad, environment=_environment(args.device), trials=trials)
    print(_table(report))
    if bad:
        print(f"WARNING: contents differ from zerostart's for: {', '.join(LABELS[b] for b in bad)}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        _log(f"wrote {args.json}")
    return 0


def _contestants(args: argparse.Namespace) -> list[str]:
    """The contestants asked for (``--only``), once the arguments are checked."""
    if args.repeat < 1:
        raise SystemExit("zerostart: error: --repeat must be at least 1")
    names = CONTESTANTS if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown:
        raise SystemExit(f"zerostart: error: unknown contestant(s) {unknown}; choose from {CONTESTANTS}")
    if args.device.startswith("cuda"):
        # torch only when the benchmark runs, not at the command's start
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("zerostart: error: --device cuda but CUDA is not available here")
    return names


def _prepare(names: list[str], path: str, files: list[str], work: str,
             device: str) -> tuple[list[str], dict[str, dict], dict[str, str]]:
    """(the contestants that run, what each prepared, why the others are skipped)."""
    skipped = {n: why for n in names if (why := available(n, device))}
    runners = [n for n in names if n not in skipped]
    extras: dict[str, dict] = {}
    for n in runners:
        try:
            extras[n] = prepare(n, path, files, os.path.join(work, "prepared", os.path.basename(os.path.normpath(path))))
        except Exception as e:  # a peer that cannot even prepare is reported, not fatal
            skipped[n] = f"setup failed: {e}"
    runners = [n for n in runners if n not in skipped]
    for n, why in skipped.items():
        _log(f"  skipping {LABELS[n]}: {why}")
    return runners, extras, skipped


def _race(runners: list[str], extras: dict[str, dict], modes: list[str], path: str, files: list[str],
          args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """Every contestant, every mode, ``--repeat`` interleaved rounds (each round in another
    order), with the ceilings measured again in every round."""
    trials: list[dict[str, Any]] = []
    ceilings: dict[str, list[float]] = {}
    all_files = files + [extras[n]["tensorizer_file"] for n in runners if "tensorizer_file" in extras.get(n, {})]
    for rnd in range(args.repeat):
        _log(f"round {rnd + 1}/{args.repeat}")
        for key, value in _ceilings.measure(files, args.device, cold=args.cold).items():
            ceilings.setdefault(key, []).append(value)
        order = runners[rnd % len(runners):] + runners[: rnd % len(runners)] if runners else []
        for mode in modes:
            for n in order:
                if mode == "cold":
                    _ceilings.drop(all_files)
                else:
                    _ceilings.warm(extras[n].get("tensorizer_file") and [extras[n]["tensorizer_file"]] or files)
                r = _trial(n, path, files, args.device, extras[n], args.threads)
                r.update(mode=mode, round=rnd)
                trials.append(r)
                if "error" in r:
                    _log(f"  {mode:4} {LABELS[n]:<26} FAILED: {r['error'].splitlines()[-1] if r['error'] else ''}")
                else:
                    _log(f"  {mode:4} {LABELS[n]:<26} {r['bytes'] / r['seconds'] / 1e9:7.2f} GB/s  ({r['seconds']:.3f} s)")
    return trials, ceilings


def _object_storage(args: argparse.Namespace, work: str) -> int:
    server = None
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "RUNAI_"))}
    try:
        if args.s3_loopback:
            if args.model and weights.is_remote(args.model):
                raise SystemExit("zerostart: error: --s3-loopback serves a local checkpoint; give --model a local path or --size")
            local = args.model or _checkpoint.ensure(work, parse_size(args.size), log=_log)
            server = _s3.LoopbackS3.start(work, _log)
            env.update(server.env())
            _log("  uploading the checkpoint ...")
            url = server.upload(local if os.path.isdir(local) else os.path.dirname(local), "zerostart-bench", "model")
        else:
            url = args.model
        rep = _s3.run(url, args.device, args.repeat, args.threads, env, work, _log, _trial)
        rep["server"] = server.kind if server else "given"
        rep["environment"] = _environment(args.device)
    finally:
        if server is not None:
            server.close()
    print(_s3.table(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
        _log(f"wrote {args.json}")
    return 0


def _sweep(path: str, files: list[str], model_bytes: int, args: argparse.Namespace) -> int:
    """Time zerostart's own settings against each other, interleaved, medians."""
    cuda = args.device.startswith("cuda")
    grid: list[dict[str, Any]] = []
    for threads in (8, 16, 32):
        for chunk_mb in (4, 16, 32):
            grid.append({"threads": threads, "chunk_bytes": chunk_mb << 20, "mmap": "never"})
    if not cuda:
        grid.append({"mmap": "always"})
    modes = ["cold", "warm"] if args.cold else ["warm"]
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeat):
        for mode in modes:
            for i, cfg in enumerate(grid):
                if mode == "cold":
                    _ceilings.drop(files)
                else:
                    _ceilings.warm(files)
                r = _trial("zerostart", path, files, args.device, {"config": cfg}, args.threads)
                if "error" in r:
                    _log(f"  {mode} {cfg}: FAILED {r['error'].splitlines()[-1] if r['error'] else ''}")
                    continue
                results.setdefault((mode, i), []).append(r["bytes"] / r["seconds"] / 1e9)
                _log(f"  {mode} {cfg}: {results[(mode, i)][-1]:.2f} GB/s {r['stats']['strategy']}")
    rows = []
    print(f"zerostart bench load --sweep: {model_bytes / 1e9:.2f} GB, device {args.device}, median of {args.repeat}")
    print(f"{'mode':<5} {'threads':>7} {'chunk MB':>8} {'strategy':<16} {'GB/s':>7}")
    for (mode, i), v in sorted(results.items(), key=lambda kv: (kv[0][0], -statistics.median(kv[1]))):
        cfg = grid[i]
        strat = "mmap" if cfg.get("mmap") == "always" else "read"
        med = statistics.median(v)
        rows.append({"mode": mode, "config": cfg, "gbps": med, "runs": v})
        print(f"{mode:<5} {cfg.get('threads', '-'):>7} {cfg.get('chunk_bytes', 0) >> 20:>8} {strat:<16} {med:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sweep": rows, "bytes": model_bytes, "device": args.device, "environment": _environment(args.device)}, f, indent=2)
    return 0


def _trial(name: str, path: str, files: list[str], device: str, extra: dict, threads: int,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    spec = json.dumps({"contestant": name, "path": path, "files": files, "device": device, "extra": extra, "threads": threads})
    proc = subprocess.run([sys.executable, "-m", "zerostart.bench._load_trial", spec], capture_output=True, text=True,
                          env=_env.child_env(env), timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"contestant": name, "error": (proc.stderr or proc.stdout).strip()[-2000:]}
    return json.loads(lines[-1])


def _summarize(trials, ceilings, runners, modes, model_bytes, device) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in ceilings.items() if v}
    rows: dict[str, dict[str, Any]] = {}
    for n in runners:
        row: dict[str, Any] = {"label": LABELS[n]}
        for mode in modes:
            ok = [t for t in trials if t["contestant"] == n and t.get("mode") == mode and "error" not in t]
            if not ok:
                row[mode] = None
                continue
            gbps = statistics.median(t["bytes"] / t["seconds"] / 1e9 for t in ok)
            row[mode] = {"gbps": gbps, "seconds": statistics.median(t["seconds"] for t in ok), "runs": len(ok),
                         "peak_rss_bytes": max(t["peak_rss_bytes"] for t in ok)}
            if device.startswith("cuda"):
                row[mode]["device_bytes"] = max(t.get("device_bytes", 0) for t in ok)
        rows[n] = row
    for mode in modes:
        peers = [rows[n][mode]["gbps"] for n in runners if not n.startswith("zerostart") and rows[n].get(mode)]
        best = max(peers) if peers else None
        ceiling = _ceiling_for(mode, device, med)
        for n in runners:
            r = rows[n].get(mode)
            if r:
                r["vs_best_peer"] = r["gbps"] / best if best else None
                r["of_ceiling"] = r["gbps"] / ceiling if ceiling else None
    ref = next((t["fingerprint"] for t in trials if t["contestant"] == "zerostart" and "fingerprint" in t), None)
    return {"ceilings_gbps": med, "ceilings_runs": ceilings, "rows": rows, "reference_fingerprint": ref}


def _ceiling_for(mode: str, device: str, med: dict[str, float]) -> float | None:
    if mode == "cold":
        return med.get("cold_read")
    if device.startswith("cuda"):
        return med.get("pinned_h2d")
    return med.get("memcpy")


def _table(rep: dict[str, Any]) -> str:
    c = rep["ceilings_gbps"]
    cuda = rep["device"].startswith("cuda")
    lines = [f"zerostart bench load: {rep['bytes'] / 1e9:.2f} GB, {rep['files']} file(s), device {rep['device']}, "
             f"median of {rep['repeat']} interleaved round(s)"]
    parts = []
    if "cold_read" in c:
        parts.append(f"cold read {c['cold_read']:.2f} GB/s (direct I/O: sequential {c.get('cold_sequential', 0):.2f}, "
                     f"parallel {c.get('cold_parallel', 0):.2f}; into fresh memory {c.get('cold_fresh', 0):.2f})")
    if "warm_read" in c:
        parts.append(f"page-cache read {c['warm_read']:.2f} GB/s")
    if "memcpy" in c:
        parts.append(f"memcpy {c['memcpy']:.2f} GB/s")
    if "pinned_h2d" in c:
        parts.append(f"pinned host->device {c['pinned_h2d']:.2f} GB/s")
    lines.append("ceilings: " + "; ".join(parts))
    modes = [m for m in ("cold", "warm") if any(r.get(m) for r in rep["rows"].values())]
    warm_ceiling = "H2D" if cuda else "memcpy"
    head = f"{'loader':<26}"
    for m in modes:
        head += f" | {m + ' GB/s':>10} {'vs best peer':>12} {('of ' + ('read' if m == 'cold' else warm_ceiling)):>10}"
        if m == "cold":
            head += f" {'of fresh':>9}"
    head += f" | {'peak RSS':>9}"
    if cuda:
        head += f" {'device':>8}"
    lines += [head, "-" * len(head)]
    for row in rep["rows"].values():
        s = f"{row['label']:<26}"
        peak = 0
        dev = 0
        for m in modes:
            r = row.get(m)
            if not r:
                s += f" | {'failed':>10} {'':>12} {'':>10}" + (f" {'':>9}" if m == "cold" else "")
                continue
            vs = f"{r['vs_best_peer']:.2f}x" if r.get("vs_best_peer") else "-"
            of = f"{r['of_ceiling'] * 100:.0f}%" if r.get("of_ceiling") else "-"
            s += f" | {r['gbps']:>10.2f} {vs:>12} {of:>10}"
            if m == "cold":
                s += f" {(r['gbps'] / c['cold_fresh'] * 100 if c.get('cold_fresh') else 0):>8.0f}%"
            peak = max(peak, r["peak_rss_bytes"])
            dev = max(dev, r.get("device_bytes", 0))
        s += f" | {peak / rep['bytes']:>8.2f}x"
        if cuda:
            s += f" {dev / rep['bytes']:>7.2f}x"
        lines.append(s)
    if "cold_fresh" in c:
        lines.append("of read: of the raw direct-I/O read ceiling; of fresh: of the same reads into newly allocated memory "
                     "(the floor for any loader that must end with the bytes in new memory)")
    if "zerostart-reserved" in rep["rows"]:
        lines.append("zerostart (reserved ahead): the same load into host memory faulted in before the clock starts "
                     "(weights.reserve_host, as a standby worker does while it waits); not a fresh-process load")
    lines.append("peak RSS: the process's peak resident memory during the load, as a multiple of the model's bytes"
                 + ("; device: device memory in use after the load, same unit" if cuda else ""))
    for n, why in rep.get("skipped", {}).items():
        lines.append(f"not run: {LABELS[n]}: {why}")
    return "\n".join(lines)


def _environment(device: str) -> dict[str, Any]:
    # torch only when the benchmark runs, not at the command's start
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                           "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for pkg in ("zerostart", "safetensors", "runai-model-streamer", "fastsafetensors", "tensorizer"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env
