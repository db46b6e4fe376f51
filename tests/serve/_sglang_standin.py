"""A stand-in for ``python -m sglang.launch_server`` (SGLang does not run on this CPU machine:
its PyPI wheels are CUDA 13 builds and its CPU backend is built from source for Intel AMX).

It takes the arguments the ``sglang`` backend passes, prints SGLang's start-up log lines in
SGLang's order, and answers SGLang's routes with SGLang's status codes:

- ``GET /health`` and ``/health_generate``: 503 until the server is up, then 200
- ``GET /get_model_info``, ``GET /get_server_info``, ``GET /v1/models``
- ``POST /v1/chat/completions``, ``/v1/completions``: a deterministic text (not a model)
- ``POST /release_memory_occupation``, ``/resume_memory_occupation`` (``{"tags": [...]}``):
  200 with a null body; without ``--enable-memory-saver`` an error (SGLang needs the memory
  saver to release anything); generation while released answers 503
- ``GET /metrics`` with ``--enable-metrics``

Knobs for tests, by environment: ``STANDIN_LOAD_S`` (seconds the "weight load" takes),
``STANDIN_HOLD_MB`` (host memory it holds while its memory is occupied, released by
``release_memory_occupation``), ``STANDIN_CRASH_ON`` (a prompt that makes it exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route


def log(msg: str) -> None:
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--served-model-name")
    p.add_argument("--mem-fraction-static", type=float)
    p.add_argument("--max-total-tokens", type=int)
    p.add_argument("--device", default="cuda")
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--enable-metrics", action="store_true")
    p.add_argument("--log-level", default="info")
    args, unknown = p.parse_known_args()
    if unknown:
        sys.exit(f"launch_server: error: unrecognized arguments: {' '.join(unknown)}")
    name = args.served_model_name or args.model_path
    state: dict[str, Any] = {"up": False, "released": False, "held": None, "requests": 0}
    hold_mb = int(os.environ.get("STANDIN_HOLD_MB", "0"))

    def occupy() -> None:
        if hold_mb:
            state["held"] = bytearray(os.urandom(1)) * (hold_mb << 20)  # touched: counted in RSS/PSS

    log(f"server_args=ServerArgs(model_path={args.model_path!r}, device={args.device!r}, "
        f"mem_fraction_static={args.mem_fraction_static}, enable_memory_saver={args.enable_memory_saver})")

    # SGLang loads the model in its scheduler process before its HTTP server listens: until
    # then connections are refused; then /health answers 503 until the warm-up request is done.
    log("Load weight begin. avail mem=20.00 GB")
    load_s = float(os.environ.get("STANDIN_LOAD_S", "0.2"))
    time.sleep(load_s)
    occupy()
    log(f"Load weight end. elapsed={load_s:.2f} s, type=LlamaForCausalLM, dtype=torch.bfloat16, "
        f"avail mem=19.70 GB, mem usage=0.30 GB.")
    log("KV Cache is allocated. #tokens: 4096, K size: 0.05 GB, V size: 0.05 GB")

    async def warm_up() -> None:
        await asyncio.sleep(0.1)
        state["up"] = True
        log("The server is fired up and ready to roll!")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = asyncio.create_task(warm_up())
        yield
        task.cancel()

    async def health(request: Request) -> Response:
        return Response(status_code=200 if state["up"] else 503)

    def text_for(prompt: str, max_tokens: int) -> str:
        if os.environ.get("STANDIN_CRASH_ON") and os.environ["STANDIN_CRASH_ON"] in prompt:
            log("Scheduler hit an exception: stand-in crash")
            os._exit(1)
        words = hashlib.sha256(prompt.encode()).hexdigest()
        return " ".join(words[i:i + 4] for i in range(0, 4 * max(1, min(max_tokens, 16)), 4))

    def not_served() -> Response | None:
        if not state["up"]:
            return JSONResponse({"object": "error", "message": "server is starting", "code": 503}, status_code=503)
        if state["released"]:
            return JSONResponse({"object": "error", "message": "memory occupation is released", "code": 503},
                                status_code=503)
        return None

    async def chat(request: Request) -> Response:
        if (r := not_served()) is not None:
            return r
        body = await request.json()
        state["requests"] += 1
        prompt = json.dumps(body.get("messages"))
        text = text_for(prompt, int(body.get("max_tokens") or 16))
        return JSONResponse({"id": f"chatcmpl-{state['requests']}", "object": "chat.completion", "created": int(time.time()),
                             "model": name, "choices": [{"index": 0, "finish_reason": "length",
                                                         "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text.split()),
                                       "total_tokens": len(prompt) // 4 + len(text.split())}})

    async def completions(request: Request) -> Response:
        if (r := not_served()) is not None:
            return r
        body = await request.json()
        state["requests"] += 1
        text = text_for(str(body.get("prompt")), int(body.get("max_tokens") or 16))
        return JSONResponse({"id": f"cmpl-{state['requests']}", "object": "text_completion", "created": int(time.time()),
                             "model": name, "choices": [{"index": 0, "text": text, "finish_reason": "length"}]})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "root": name,
                                                         "max_model_len": 8192}]})

    async def model_info(request: Request) -> Response:
        return JSONResponse({"model_path": args.model_path, "tokenizer_path": args.model_path, "is_generation": True})

    async def server_info(request: Request) -> Response:
        return JSONResponse({"model_path": args.model_path, "device": args.device,
                             "mem_fraction_static": args.mem_fraction_static,
                             "enable_memory_saver": args.enable_memory_saver, "version": "stand-in"})

    async def release(request: Request) -> Response:
        if not args.enable_memory_saver:
            return JSONResponse({"object": "error", "message": "release_memory_occupation needs --enable-memory-saver",
                                 "code": 400}, status_code=400)
        state["released"], state["held"] = True, None
        log("Release memory occupation: done")
        return JSONResponse(None)

    async def resume(request: Request) -> Response:
        if not args.enable_memory_saver:
            return JSONResponse({"object": "error", "message": "resume_memory_occupation needs --enable-memory-saver",
                                 "code": 400}, status_code=400)
        occupy()
        state["released"] = False
        log("Resume memory occupation: done")
        return JSONResponse(None)

    async def metrics(request: Request) -> Response:
        if not args.enable_metrics:
            return PlainTextResponse("Not Found", status_code=404)
        return PlainTextResponse(f'sglang:num_requests_total{{model_name="{name}"}} {state["requests"]}\n')

    app = Starlette(routes=[
        Route("/health", health), Route("/health_generate", health),
        Route("/get_model_info", model_info), Route("/get_server_info", server_info),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/completions", completions, methods=["POST"]),
        Route("/release_memory_occupation", release, methods=["GET", "POST"]),
        Route("/resume_memory_occupation", resume, methods=["GET", "POST"]),
        Route("/metrics", metrics),
    ], lifespan=lifespan)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
