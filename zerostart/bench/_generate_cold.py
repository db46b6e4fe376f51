"""``zerostart bench generate``'s cold starts: fresh processes from spawn to the first generated
token, zerostart and transformers, split into spawn (the interpreter starting), import, load
(device init, read, prepare), warm-up and first token. Timestamps are CLOCK_MONOTONIC
(``time.perf_counter`` on Linux), shared by parent and child."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import zerostart
from zerostart.bench._engine_run import prompts, sync

COLD_COLUMNS = ("spawn", "import", "load", "warmup", "first_token")


def run(args, model_path: str, dtypes: list[str]) -> dict[str, Any]:
    """Cold starts of both contestants in every dtype, interleaved, ``--cold-repeat`` each;
    medians per phase: ``{dtype: {contestant: {"runs", "median"}}}``."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    contestants = [(c, d) for d in dtypes for c in ["zerostart"] + ([] if args.no_transformers else ["transformers"])]
    runs: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in contestants}
    for _ in range(args.cold_repeat):
        for c, dtype in contestants:  # interleaved
            cmd = [sys.executable, "-m", "zerostart", "bench", "generate", "--child", c, "--model", model_path,
                   "--device", args.device, "--prompt-tokens", str(args.prompt_tokens), "--dtype", dtype]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.cuda_graphs == "off":
                cmd += ["--cuda-graphs", "off"]
            if args.compile:
                cmd += ["--compile"]
            t0 = time.perf_counter()
            r = subprocess.run(cmd + ["--t0", repr(t0)], capture_output=True, text=True, env=env, timeout=1800)
            if r.returncode != 0:
                raise RuntimeError(f"cold-start child ({c}, {dtype}) failed:\n{r.stderr[-2000:]}")
            runs[(c, dtype)].append(json.loads(r.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {}
    for (c, dtype), rs in runs.items():
        if rs:
            out.setdefault(dtype, {})[c] = {"runs": rs, "median": {k: statistics.median(r[k] for r in rs) for k in rs[0]}}
    return out


def child(args, t_start: float) -> int:
    # One cold start, from the parent's spawn to the first token; prints one JSON line.
    t0 = args.t0
    spawn_end = t_start
    if args.child == "zerostart":
        from zerostart.engine import Engine  # torch and the engine
        from zerostart.telemetry import Timeline

        # timed: the cold start's import phase
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        # timed: the cold start's import phase
        from zerostart.engine import EngineConfig, SamplingParams

        tl = Timeline(origin=t0)
        cfg = EngineConfig(max_model_len=args.prompt_tokens + 64, max_num_seqs=1,
                           cuda_graphs=args.cuda_graphs == "on", compile=args.compile)
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, config=cfg, timeline=tl)
        prompt = prompts(engine.model_config.vocab_size, 1, args.prompt_tokens, engine.tokenizer.bos_token_id)[0]
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
        # timed: the cold start's import phase
        import torch
        import transformers

        if args.threads:
            torch.set_num_threads(args.threads)
        import_end = time.perf_counter()
        # timed: the cold start's import phase
        from zerostart.names import dtype_name

        dtype = getattr(torch, dtype_name(args.dtype))
        if args.device.startswith("cuda"):
            torch.empty(1, device=args.device)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        sync(args.device)
        load_end = time.perf_counter()
        prompt = prompts(model.config.vocab_size, 1, args.prompt_tokens, tok.bos_token_id)[0]
        ids = torch.tensor([prompt], device=args.device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=0)
        sync(args.device)
        first = time.perf_counter()
        out = {"spawn": spawn_end - t0, "import": import_end - spawn_end, "load": load_end - import_end,
               "warmup": 0.0, "first_token": first - t}
    out["total"] = first - t0
    print(json.dumps(out))
    return 0


