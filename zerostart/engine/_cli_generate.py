"""``zerostart generate``: complete a prompt; only the completion goes to stdout."""

from __future__ import annotations

import argparse
import sys
import time

from zerostart.engine.demo import GIBBERISH_NOTE, is_random_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="Hugging Face model directory, GGUF file, ready image, or hf://, s3://, https:// source")
    parser.add_argument("--prompt", required=True, help="prompt text ('-' reads it from stdin)")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the engine's for the "
                                                      "device, zerostart.names.default_dtype)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, at most 8192)")
    parser.add_argument("--timings", action="store_true", help="print load phases and generation speed on stderr")


def main(args: argparse.Namespace) -> int:
    # torch only when it runs: the command's parser needs none
    from zerostart.engine import Engine, EngineConfig, SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop)
    config = EngineConfig(max_model_len=args.max_model_len, max_num_seqs=1)
    if is_random_demo(args.model):
        print(f"zerostart: note: {args.model} is a demo model with {GIBBERISH_NOTE}", file=sys.stderr)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, config=config)
    if args.chat:
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
    else:
        ids = engine.tokenizer.encode(prompt)
    t0 = time.perf_counter()
    first = None
    n = 0
    reason = None
    out = sys.stdout
    for ev in engine.generate(ids, params):
        if first is None:
            first = time.perf_counter()
        n = ev.completion_tokens
        reason = ev.finish_reason or reason
        if ev.text:
            out.write(ev.text)
            out.flush()
    if out.isatty():
        out.write("\n")
    out.flush()
    if args.timings:
        end = time.perf_counter()
        print(engine.timeline.table(), file=sys.stderr)
        decode_s = end - (first or end)
        rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
        print(f"prompt {len(ids)} tokens, completion {n} tokens ({reason}); first token {(first or end) - t0:.3f} s, "
              f"then {rate:.1f} tokens/s", file=sys.stderr)
    return 0
