"""One real cold start of a model per rung, for ``zerostart coldstart``: each is a worker
process (the one the server runs, ``python -m zerostart.serve.worker``) answering a completion,
timed to its first token, with the worker's own phases on the same clock."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from zerostart import engine, snapshot, weights
from zerostart.bench import _ceilings, _env
from zerostart.bench._env import log as _log
from zerostart.names import device_type
from zerostart.telemetry import Timeline
from zerostart.weights import arena_bytes


class _Worker:
    """A worker process on a loopback port, and its control routes."""

    def __init__(self, model: str | None, args: argparse.Namespace, images: str = "off", parkable: bool = False,
                 standby: bool = False, reserve: int = 0, threads: int | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "zerostart.serve.worker", "--port", str(self.port), "--device", args.device]
        if standby:  # what to load comes in POST /zerostart/load
            cmd.append("--standby")
            if reserve:
                cmd += ["--reserve", str(reserve)]
        else:
            cmd += ["--model", model, "--images", images] + (["--dtype", args.dtype] if args.dtype else [])
            if parkable:
                cmd.append("--parkable")
            if threads:
                cmd += ["--threads", str(threads)]
        self.t0 = time.perf_counter()
        self.t0_unix = time.time()
        self.proc = subprocess.Popen(cmd, env=_env.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.timeout = args.timeout

    def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read() or b"{}")
            except ValueError:
                return e.code, {}

    def wait_ready(self, want: str = "ready") -> dict:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"worker exited ({self.proc.returncode}): {err[-800:]}")
            try:
                status, body = self.call("GET", "/zerostart/ready?wait=5", timeout=30)
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.005)
                continue
            if body.get("state") == want:
                return body
            if body.get("state") == "failed":
                raise RuntimeError(f"worker failed to load: {body.get('error')}")
        raise RuntimeError(f"worker not {want} within {self.timeout} s")

    def first_token(self, prompt_tokens: int) -> float:
        status, body = self.call("POST", "/v1/completions", {"model": "any", "prompt": [7] * prompt_tokens, "max_tokens": 1,
                                                             "temperature": 0})
        if status != 200:
            raise RuntimeError(f"first request failed: HTTP {status} {body}")
        return time.perf_counter()

    def phases(self) -> dict:
        status, body = self.call("GET", "/zerostart/phases")
        if status != 200:
            raise RuntimeError(f"phases route answered {status}")
        return body

    def close(self) -> None:
        _env.stop(self.proc)


def _timeline_from(w: _Worker, start: float, end: float, include_spawn: bool, since: float | None = None) -> dict:
    """The worker's phases on our clock (seconds from ``start``), plus spawn and first token."""
    t = Timeline(origin=start)
    body = w.phases()
    shift = body.get("origin_unix", w.t0_unix) - w.t0_unix + (w.t0 - start)
    if include_spawn:  # process start until the worker's first phase (interpreter, server up)
        first = min((p["start_s"] for p in body.get("phases", [])), default=0.0)
        t.add_relative("spawn", w.t0 - start, shift + first)
    for p in body.get("phases", []):
        s, e = p["start_s"] + shift, p["end_s"] + shift
        if since is not None and e <= since - start:
            continue  # happened before this cold start (a standby's imports, a parked worker's load)
        t.add_relative(p["name"], s, e, bytes=p.get("bytes", 0), **p.get("detail", {}))
    ready = max((p.end for p in t.phases), default=0.0)
    t.add_relative("first_token", ready, end - start)
    return t.to_dict()


def _make_cold(files: list[str], args) -> None:
    """The files a start reads made cold as ``--page-cache`` says (coldstart.PAGE_CACHE)."""
    if args.page_cache != "warm":
        _ceilings.drop(files, machine=args.page_cache == "machine")


def _run_fresh(rung: str, path: str, args, files: list[str]) -> dict:
    """A cold start in a new worker process loading ``path`` (the source or the ready image)."""
    _make_cold(files, args)
    w = _Worker(path, args, images="off")
    try:
        w.wait_ready()
        end = w.first_token(args.prompt_tokens)
        tl = _timeline_from(w, w.t0, end, include_spawn=True)
    finally:
        w.close()
    return {"rung": rung, "total_s": end - w.t0, "timeline": tl}


def _run_source(model: str, image: str | None, args, files: list[str]) -> dict:
    return _run_fresh("source", model, args, files)


def _run_image(model: str, image: str | None, args, files: list[str]) -> dict:
    if image is None:
        raise RuntimeError("the image rung needs a ready image, and none was written")
    return _run_fresh("image", image, args, files)


def _run_standby(model: str, image: str | None, args, files: list[str], reserve: bool = False) -> dict:
    nbytes = arena_bytes(files) if reserve and args.device == "cpu" else 0  # covers the image's arena
    w = _Worker(None, args, standby=True, reserve=nbytes)
    try:
        w.wait_ready(want="standby")
        _make_cold(files, args)
        start = time.perf_counter()
        status, body = w.call("POST", "/zerostart/load", {"model": image, "device": args.device, "dtype": args.dtype,
                                                          "images": "off"})
        if status not in (200, 202):
            raise RuntimeError(f"standby load answered HTTP {status}: {body}")
        w.wait_ready()
        end = w.first_token(args.prompt_tokens)
        tl = _timeline_from(w, start, end, include_spawn=False, since=start)
    finally:
        w.close()
    return {"rung": "reserve" if reserve else "standby", "total_s": end - start, "timeline": tl}


def _run_reserve(model: str, image: str | None, args, files: list[str]) -> dict:
    return _run_standby(model, image, args, files, reserve=True)


def _run_parked(model: str, image: str | None, args, files: list[str]) -> dict:
    w = _Worker(model, args, images="off", parkable=True)
    try:
        w.wait_ready()
        w.first_token(args.prompt_tokens)
        status, body = w.call("POST", "/zerostart/park")
        if status != 200:
            raise RuntimeError(f"park answered HTTP {status}: {body}")
        time.sleep(0.2)
        start = time.perf_counter()
        status, body = w.call("POST", "/zerostart/wake")
        if status != 200:
            raise RuntimeError(f"wake answered HTTP {status}: {body}")
        end = w.first_token(args.prompt_tokens)
        tl = _timeline_from(w, start, end, include_spawn=False, since=start)
        if not any(p["name"] == "wake" for p in tl["phases"]):  # the worker's wake as reported by the route
            wake_s = float(body.get("wake_s", 0.0))
            tl["phases"].insert(0, {"name": "wake", "start_s": 0.0, "end_s": wake_s, "seconds": wake_s,
                                    "bytes": body.get("bytes", 0), "gbps": body.get("gbps", 0)})
    finally:
        w.close()
    return {"rung": "parked", "total_s": end - start, "timeline": tl}


RUNNERS = {"source": _run_source, "image": _run_image, "standby": _run_standby, "reserve": _run_reserve,
            "parked": _run_parked}


def ensure_image(model: str, model_dir: str, args) -> str:
    """The model's ready image in the server's image store (written once, untimed; written again
    when its source's bytes changed)."""
    dtype = engine.weights_dtype(model_dir, args.device, args.dtype)
    fp = snapshot.fingerprint(model_dir, device_type(args.device), str(dtype))
    out = snapshot.image_store(model, fp)
    if snapshot.is_image(out):
        try:
            snapshot.check_compatible(out, fp, weights.identity(model))
            return out
        except snapshot.ImageError as e:
            _log(f"  replacing the ready image: {e}")
            shutil.rmtree(out)
    _log(f"  writing the ready image (untimed) to {out}")
    cmd = [sys.executable, "-m", "zerostart", "snapshot", "--model", model, "--out", out, "--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    r = subprocess.run(cmd, env=_env.child_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"zerostart: error: writing the image failed: {r.stderr.strip()[-600:]}")
    return out


# --- report -------------------------------------------------------------------------------------
