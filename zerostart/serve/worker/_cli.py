"""The worker process's command line. Started by the gateway (the ``zerostart`` backend) with
a listening socket already bound (``--fd``) and what to load as one ``LoadSpec`` (``--spec``,
its JSON: ``serve/control.py``), or as a standby worker that waits for the same object in
``POST /zerostart/load``::

    python -m zerostart.serve.worker --fd 5 --spec '{"model": "/models/llama", "name": "llama", ...}'
                                     [--grammar-timeout 10] [--max-grammar-bytes 131072]
    python -m zerostart.serve.worker --fd 5 --standby [--device cuda] [--reserve BYTES] [--grammar-timeout 10] ...

or by hand, for a direct comparison, ``zerostart coldstart`` or debugging, with the model's
settings as flags (the keys of a config file's model entry)::

    python -m zerostart.serve.worker --model SOURCE [--name NAME] [--device cpu] [--dtype bfloat16]
        [--images off|use|write] [--parkable] [--max-model-len N] [--quantize auto|none|int8|int4]
        [--kv-dtype auto|float32|bfloat16|float16] [--kv-cache-bytes N] [--threads N]
        [--pooling last|mean [--no-normalize]] (--port 8001 [--host 127.0.0.1] | --uds /tmp/w.sock)

It serves HTTP at once and loads the model in the background, so the gateway can ask how the
load is going (``_app.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time

import uvicorn
from pydantic import ValidationError

from zerostart.names import DTYPES, IMAGE_MODES, KV_DTYPES, QUANTIZE_MODES
from zerostart.serve._config import EmbeddingConfig, ModelConfig, ServerConfig
from zerostart.serve._keys import describe_errors
from zerostart.serve.control import TOKEN_ENV, LoadSpec, load_spec
from zerostart.serve.edge import bounded_protocol
from zerostart.serve.worker._app import SHUTDOWN_GRACE_S, build_app
from zerostart.serve.worker._holder import Holder
from zerostart.serve.worker._memory import for_loading
from zerostart.serve.worker._structured import GrammarBudget

_ORPHAN_GRACE_S = 10.0  # after the gateway is gone: time to shut down cleanly before a hard exit
# Its gateway opens at most max_concurrency connections (plus a few for control): these bound
# anyone else who reaches the socket before the token check.
_MAX_CONNECTIONS = 4096
_HEADER_TIMEOUT_S = 10.0
# the flags that say what to load, by hand (a gateway's worker has them in --spec; a standby takes them in /load)
_LOAD_FLAGS = ("name", "dtype", "images", "parkable", "max_model_len", "quantize", "kv_dtype", "kv_cache_bytes", "threads",
               "pooling", "no_normalize")


def main(argv: list[str] | None = None, origin: tuple[float, float] | None = None) -> int:
    """Run a worker until SIGTERM (or until the gateway that started it goes away). ``origin``:
    ``(perf_counter, time)`` when the process began running our code (``__main__`` takes it
    first thing); phases are measured from it."""
    origin = origin or (time.perf_counter(), time.time())
    for_loading()  # before the load's first large block (_memory.py)
    parser = _parser()
    args = parser.parse_args(argv)
    spec = _spec(args, parser)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    holder = Holder(*origin, GrammarBudget(timeout=args.grammar_timeout, max_bytes=args.max_grammar_bytes))
    if spec is None:
        holder.start_standby(args.device, reserve=args.reserve)
    else:
        holder.start(spec)  # overlaps the load with the server's start
    if args.fd is not None:
        _watch_parent()
    sock = _socket(args)
    token = os.environ.pop(TOKEN_ENV, None)  # not passed on to anything this process starts
    protocol = bounded_protocol(max_connections=_MAX_CONNECTIONS, header_timeout=_HEADER_TIMEOUT_S)
    config = uvicorn.Config(build_app(holder, spec.name if spec is not None else "standby", token),
                            log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S, http=protocol)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zerostart.serve.worker", description="a zerostart worker (one model)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--spec", metavar="JSON", help="what to load: a LoadSpec (serve/control.py) as JSON, as a "
                                                     "gateway passes it")
    what.add_argument("--model", help="model directory, .safetensors or .gguf file, ready image, hf://org/name, "
                                      "s3://... or https://...")
    what.add_argument("--standby", action="store_true",
                      help="import and initialize the device, then wait for POST /zerostart/load")
    p.add_argument("--reserve", type=int, default=0, metavar="BYTES",
                   help="with --standby on cpu: fault in this much host memory while waiting; the model's "
                        "weights are read straight into it (default 0: none)")
    p.add_argument("--device", default=None, help="with --model or --standby (default cpu)")
    hand = p.add_argument_group("with --model: the model's settings, as in a config file's model entry")
    hand.add_argument("--name", help="served model name (default: the model directory's name)")
    hand.add_argument("--dtype", default=None, choices=DTYPES)
    # The gateway always says (its default is the config's); a worker started by hand touches
    # no image store unless asked.
    hand.add_argument("--images", default="off", choices=IMAGE_MODES,
                      help="ready images: off, use (restore a matching one), write (use, and write one after a "
                           "load from the source); default off")
    hand.add_argument("--parkable", action="store_true", help="load so that the model can be parked (CUDA: VMM memory)")
    hand.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion (tokens)")
    hand.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                      help="how matrices are held: auto (as stored: a GGUF file's quants stay quantized), none "
                           "(all floats), int8 or int4 (float matrices quantized at load); default auto")
    hand.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                      help="the KV cache's dtype: auto (the activations'; bfloat16 on CPU for a quantized model), "
                           "float32, bfloat16, float16 (CUDA only); default auto")
    hand.add_argument("--kv-cache-bytes", type=int, default=None, help="the engine's KV cache size")
    hand.add_argument("--threads", type=int, default=None,
                      help="CPU compute threads (torch intra-op; default: torch's, one per core)")
    hand.add_argument("--pooling", choices=("last", "mean"), default=None,
                      help="serve the model as an embedding model (/v1/embeddings only), pooling the last token's "
                           "hidden state or the mean over the input")
    hand.add_argument("--no-normalize", action="store_true",
                      help="with --pooling: do not scale embeddings to unit length")
    limits = ServerConfig.model_fields  # the gateway passes its server settings; these are their defaults
    p.add_argument("--grammar-timeout", type=float, default=limits["grammar_timeout"].default, metavar="SECONDS",
                   help="a request's grammar (response_format, forced tool calls) must compile within this, else 400 "
                        "(server.grammar_timeout)")
    p.add_argument("--max-grammar-bytes", type=int, default=limits["max_grammar_bytes"].default, metavar="BYTES",
                   help="a larger schema or grammar is refused with 400 (server.max_grammar_bytes)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="an inherited, listening socket (set by the gateway)")
    where.add_argument("--uds", help="listen on this Unix socket path")
    where.add_argument("--port", type=int, help="listen on this TCP port")
    p.add_argument("--host", default="127.0.0.1", help="with --port")
    return p


def _spec(args: argparse.Namespace, p: argparse.ArgumentParser) -> LoadSpec | None:
    """What to load (None: a standby worker), or exit naming the flag that is wrong."""
    if args.grammar_timeout <= 0 or args.max_grammar_bytes < 1:
        p.error("--grammar-timeout must be > 0 seconds and --max-grammar-bytes >= 1")
    if args.reserve < 0:
        p.error(f"--reserve must be >= 0 bytes, got {args.reserve}")
    if args.reserve and not args.standby:
        p.error("--reserve applies to a standby worker (--standby): a worker that loads at once gains nothing from it")
    given = [f"--{k.replace('_', '-')}" for k in _LOAD_FLAGS if getattr(args, k) not in (None, False, "off")]
    if args.spec is not None:
        if given or args.device is not None:
            p.error(f"{', '.join(given + (['--device'] if args.device else []))}: with --spec, what to load is in it")
        try:
            return LoadSpec.model_validate_json(args.spec)
        except ValidationError as e:
            p.error(f"--spec: {describe_errors(e, LoadSpec)}")
    args.device = args.device or "cpu"
    if args.standby:
        if given:
            p.error(f"{', '.join(given)}: a standby worker takes what to load in POST /zerostart/load")
        return None
    if args.no_normalize and not args.pooling:
        p.error("--no-normalize applies to an embedding model (--pooling last|mean)")
    embedding = EmbeddingConfig(pooling=args.pooling, normalize=not args.no_normalize) if args.pooling else None
    try:
        model = ModelConfig(path=args.model, name=args.name, device=args.device, dtype=args.dtype, images=args.images,
                            max_model_len=args.max_model_len, quantize=args.quantize or "auto",
                            kv_dtype=args.kv_dtype or "auto",
                            kv_cache_bytes=args.kv_cache_bytes, threads=args.threads, embedding=embedding)
    except ValidationError as e:
        p.error("; ".join(_flag_error(err["loc"], err["msg"].removeprefix("Value error, ")) for err in e.errors()))
    return load_spec(model, parkable=args.parkable, kv_cache_bytes=model.kv_cache_bytes, threads=model.threads)


def _watch_parent() -> None:
    """The gateway holds our stdin open; end-of-file means it is gone, and so should we be."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(_ORPHAN_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="zerostart-parent-watch", daemon=True).start()


def _socket(args: argparse.Namespace) -> socket.socket:
    if args.fd is not None:
        return socket.socket(fileno=args.fd)
    if args.uds:
        if os.path.exists(args.uds):
            os.unlink(args.uds)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.uds)
    else:
        # IPPROTO_TCP, so asyncio turns Nagle off on each connection (else small writes wait 40 ms)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    sock.listen(1024)
    return sock


def _flag_error(loc: tuple, msg: str) -> str:
    """A model entry's validation error as the flag's: ``--key: why`` (``--model`` for its path;
    a check across keys has no location, and its message starts with the key it names)."""
    if loc:
        key = str(loc[0])
    else:
        key, sep, rest = msg.partition(": ")
        if not (sep and key.isidentifier()):
            return msg
        msg = rest
    return f"--{'model' if key == 'path' else key.replace('_', '-')}: {msg}"
