"""``bench load`` from object storage: zerostart's streaming path against Run:ai Model
Streamer's S3 path and a plain download-then-load, beside the server's raw ranged-GET
throughput measured in the same run.

``--s3-loopback`` starts a real S3-protocol server on 127.0.0.1 (s3rver, through npm, when
Node.js is available; otherwise moto's server mode, which is far slower) and uploads the
checkpoint to it, so the numbers need no cloud account.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable

from zerostart import weights
from zerostart.bench import _env

S3_CONTESTANTS = ["zerostart", "zerostart-nocache", "runai", "download"]
S3_LABELS = {
    "zerostart": "zerostart (stream + cache)",
    "zerostart-nocache": "zerostart (stream only)",
    "runai": "Run:ai Model Streamer (S3)",
    "download": "download, then load",
}


class LoopbackS3:
    """A local S3 server for benchmarks: s3rver (Node.js) if possible, else moto."""

    port: int
    url: str  # http://127.0.0.1:<port>
    data: str  # the server's data directory
    kind: str  # "s3rver" or "moto"
    key: str
    secret: str
    proc: subprocess.Popen

    @staticmethod
    def start(work: str, log: Callable[[str], None]) -> "LoopbackS3":
        self = LoopbackS3.__new__(LoopbackS3)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tempfile.mkdtemp(prefix="s3-data-", dir=work)
        s3rver = _ensure_s3rver(work, log)
        if s3rver:
            self.kind = "s3rver"
            self.key = self.secret = "S3RVER"
            cmd = [s3rver, "-d", self.data, "-a", "127.0.0.1", "-p", str(self.port), "-s", "--no-vhost-buckets"]
        else:
            self.kind = "moto"
            self.key = self.secret = "testing"
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)
        else:
            self.close()
            raise RuntimeError(f"the loopback S3 server ({self.kind}) did not start")
        log(f"  loopback S3 server: {self.kind} on {self.url}")
        return self

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}

    def upload(self, local_dir: str, bucket: str, prefix: str) -> str:
        # boto3 (optional): only when objects are uploaded
        import boto3
        from boto3.s3.transfer import TransferConfig

        c = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.key, aws_secret_access_key=self.secret,
                         region_name="us-east-1")
        c.create_bucket(Bucket=bucket)
        cfg = TransferConfig(multipart_threshold=1 << 40)  # single-part objects: plain ETags
        for name in sorted(os.listdir(local_dir)):
            p = os.path.join(local_dir, name)
            if os.path.isfile(p) and not name.startswith("."):
                c.upload_file(p, bucket, f"{prefix}/{name}", Config=cfg)
        return f"s3://{bucket}/{prefix}"

    def close(self) -> None:
        _env.stop(self.proc)
        shutil.rmtree(self.data, ignore_errors=True)


def _ensure_s3rver(work: str, log: Callable[[str], None]) -> str | None:
    exe = os.path.join(work, "s3rver", "node_modules", ".bin", "s3rver")
    if os.path.exists(exe):
        return exe
    if not shutil.which("npm") or not shutil.which("node"):
        log("  Node.js/npm not found: using moto's S3 server (much slower than a real S3 server)")
        return None
    os.makedirs(os.path.dirname(os.path.dirname(os.path.dirname(exe))), exist_ok=True)
    log("  installing s3rver (npm) for a loopback S3 server ...")
    r = subprocess.run(["npm", "install", "--silent", "--prefix", os.path.join(work, "s3rver"), "s3rver@3.7.1"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not os.path.exists(exe):
        log(f"  npm install s3rver failed ({r.stderr.strip()[-300:]}); using moto's S3 server")
        return None
    return exe


def raw_ceiling(url: str, env: dict[str, str], concurrency: int, part: int, fresh: bool = False) -> float:
    """Plain concurrent ranged GETs of every weight object: GB/s. The bytes land in one reused
    buffer per thread, or with ``fresh`` in newly allocated memory as big as the objects (the
    floor for any loader that must end with the bytes in new memory)."""
    code = (
        "import json,sys,time,threading\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from zerostart.weights import Region, open_store\n"
        f"t=open_store({url!r}); objs=[o for o in t.list() if o.name.endswith('.safetensors')]\n"
        f"part={part}; loc=threading.local(); fresh={fresh!r}\n"
        "base={}; total=0\n"
        "for o in objs: base[o.name]=total; total+=o.size\n"
        "def get(a):\n"
        "    o,off=a; n=min(part,o.size-off)\n"
        "    if fresh: t.read_range(o,off,dest[base[o.name]+off:base[o.name]+off+n]); return\n"
        "    b=getattr(loc,'b',None)\n"
        "    if b is None: b=loc.b=bytearray(part)\n"
        "    t.read_range(o,off,memoryview(b)[:n])\n"
        "jobs=[(o,off) for o in objs for off in range(0,o.size,part)]\n"
        "t0=time.perf_counter()\n"
        "dest=Region.anonymous(max(total,1)).buffer() if fresh else None\n"
        f"with ThreadPoolExecutor({concurrency}) as ex: list(ex.map(get,jobs))\n"
        "print(json.dumps({'gbps': sum(o.size for o in objs)/(time.perf_counter()-t0)/1e9})); t.close()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env.child_env(env), timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"raw throughput probe failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["gbps"]


def run(url: str, device: str, repeat: int, threads: int, env: dict[str, str], work: str, log: Callable[[str], None],
        trial: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        weights.reset_credentials()
        opened = weights.open_source(url, use_cache=False)
        files = [h.path for h in opened.checkpoint.headers]
        model_bytes = opened.checkpoint.nbytes
        opened.finish(False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    log(f"bench load (object storage): {url}: {model_bytes / 1e9:.2f} GB in {len(files)} object(s), device {device}")
    trials: list[dict[str, Any]] = []
    ceilings: list[float] = []
    fresh_ceilings: list[float] = []
    for rnd in range(repeat):
        ceilings.append(raw_ceiling(url, env, threads, 16 << 20))
        fresh_ceilings.append(raw_ceiling(url, env, threads, 16 << 20, fresh=True))
        log(f"round {rnd + 1}/{repeat}: raw ranged GETs {ceilings[-1]:.2f} GB/s, into fresh memory {fresh_ceilings[-1]:.2f} GB/s")
        order = S3_CONTESTANTS[rnd % len(S3_CONTESTANTS):] + S3_CONTESTANTS[: rnd % len(S3_CONTESTANTS)]
        for name in order:
            cache = tempfile.mkdtemp(prefix="cache-", dir=work)  # an empty cache every time
            trial_env = dict(env, ZEROSTART_CACHE_DIR=cache)
            extra: dict[str, Any] = {"source": url, "download_dir": tempfile.mkdtemp(prefix="dl-", dir=work), "threads": threads}
            r = trial(name, url, files, device, extra, threads, trial_env)
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(extra["download_dir"], ignore_errors=True)
            r.update(round=rnd, mode="s3")
            trials.append(r)
            if "error" in r:
                log(f"  {S3_LABELS[name]:<28} FAILED: {r['error'].splitlines()[-1] if r['error'] else ''}")
            else:
                log(f"  {S3_LABELS[name]:<28} {r['bytes'] / r['seconds'] / 1e9:7.2f} GB/s  ({r['seconds']:.2f} s)")
    ceiling = statistics.median(ceilings)
    fresh = statistics.median(fresh_ceilings)
    rows = {}
    for name in S3_CONTESTANTS:
        ok = [t for t in trials if t["contestant"] == name and "error" not in t]
        rows[name] = {"label": S3_LABELS[name], "gbps": statistics.median(t["bytes"] / t["seconds"] / 1e9 for t in ok) if ok else None,
                      "runs": len(ok), "peak_rss_bytes": max((t["peak_rss_bytes"] for t in ok), default=0)}
    peers = [r["gbps"] for n, r in rows.items() if not n.startswith("zerostart") and r["gbps"]]
    best = max(peers) if peers else None
    for r in rows.values():
        if r["gbps"]:
            r["vs_best_peer"] = r["gbps"] / best if best else None
            r["of_raw"] = r["gbps"] / ceiling
            r["of_fresh"] = r["gbps"] / fresh
    ref = next((t.get("fingerprint") for t in trials if t["contestant"] == "zerostart" and "fingerprint" in t), None)
    bad = sorted({t["contestant"] for t in trials if ref and t.get("fingerprint") not in (None, ref)})
    return {"source": url, "bytes": model_bytes, "objects": len(files), "device": device, "repeat": repeat,
            "raw_gbps": ceiling, "raw_runs": ceilings, "raw_fresh_gbps": fresh, "raw_fresh_runs": fresh_ceilings, "rows": rows, "mismatched": bad, "trials": trials}


def table(rep: dict[str, Any]) -> str:
    lines = [f"zerostart bench load (object storage): {rep['bytes'] / 1e9:.2f} GB in {rep['objects']} object(s) from "
             f"{rep['source']}, device {rep['device']}, median of {rep['repeat']} interleaved round(s)",
             f"ceilings: plain concurrent ranged GETs from the same server {rep['raw_gbps']:.2f} GB/s "
             f"(into one reused buffer per thread), {rep['raw_fresh_gbps']:.2f} GB/s into freshly allocated memory",
             f"{'loader':<30} {'GB/s':>7} {'vs best peer':>12} {'of raw GETs':>11} {'of fresh':>9} {'peak RSS':>9}"]
    lines.append("-" * len(lines[-1]))
    for r in rep["rows"].values():
        if not r["gbps"]:
            lines.append(f"{r['label']:<30} {'failed':>7}")
            continue
        vs = f"{r['vs_best_peer']:.2f}x" if r.get("vs_best_peer") else "-"
        lines.append(f"{r['label']:<30} {r['gbps']:>7.2f} {vs:>12} {r['of_raw'] * 100:>10.0f}% {r['of_fresh'] * 100:>8.0f}% "
                     f"{r['peak_rss_bytes'] / rep['bytes']:>8.2f}x")
    lines.append("every loader ends with every byte in memory on the device; each trial starts with an empty cache")
    if rep["mismatched"]:
        lines.append(f"WARNING: contents differ from zerostart's for: {', '.join(rep['mismatched'])}")
    return "\n".join(lines)
