"""``zerostart snapshot --model PATH [--out DIR]``: write a ready image of a model."""

from __future__ import annotations

import argparse
import sys
import time

from zerostart import snapshot, weights
from zerostart.names import QUANTIZE_MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a checkpoint directory, hf://org/name, s3:// or https:// source")
    p.add_argument("--out", help="image directory (default: the image store the server looks in)")
    p.add_argument("--device", default="cpu", help="device the image is for: cpu or cuda (default cpu)")
    p.add_argument("--dtype", help="weights dtype in the image (default: the engine's default for the device)")
    p.add_argument("--quantize", default="auto", choices=QUANTIZE_MODES,
                   help="how matrices are held (default auto: as stored; a GGUF file's quants stay quantized)")


def main(args: argparse.Namespace) -> int:
    # torch only when it runs: the command's parser needs none
    from zerostart.engine import Engine, EngineConfig

    t0 = time.perf_counter()
    print(f"snapshot: loading {args.model} on {args.device} ...", file=sys.stderr)
    identity = None if snapshot.is_image(args.model) else weights.identity(args.model)  # before the bytes are read
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    config=EngineConfig(quantize=args.quantize))
    model_dir = weights.localize(args.model) if not snapshot.is_image(args.model) else args.model
    fp = snapshot.fingerprint(model_dir, engine.device.type, str(engine.dtype), args.quantize)
    out = args.out or snapshot.image_store(args.model, fp)
    t1 = time.perf_counter()
    path = snapshot.write_engine_image(engine, model_dir, out, fp, source=args.model, source_identity=identity)
    m = snapshot.read_manifest(path)
    held = ", ".join(f"{n} x {f}" for f, n in m["weights"]["quantized"].items()) or "no matrix quantized"
    print(f"snapshot: wrote {m['weights']['bytes'] / 1e9:.2f} GB ({m['weights']['tensors']} tensors, {engine.dtype}, "
          f"{held}, {engine.device.type}) in {time.perf_counter() - t1:.1f} s (load and prepare {t1 - t0:.1f} s)", file=sys.stderr)
    print(path)
    return 0
