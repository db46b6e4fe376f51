"""Grammar engines side by side: llguidance, xgrammar and outlines-core on one tokenizer.

    .venv/bin/pip install llguidance xgrammar outlines-core
    flock /tmp/zerostart-bench.lock .venv/bin/python bench/grammar_engines.py \
        --tokenizer MODEL_DIR --json bench/results/grammar-engines.json

Every engine walks the same token sequences: valid documents (an object for ``json_object``, a
document for a nested ``json_schema``, a Hermes ``<tool_call>`` block for a tool grammar)
tokenized by the model's own tokenizer. At each token the engine computes the allowed-token
bitmask (timed), the walk checks that the document's next token is allowed (an engine that
refuses a valid document fails the row), then the token is accepted (timed). Batch 16 runs 16
matchers through the same walk with the engine's batched call where it has one. Also timed:
importing the library, the tokenizer set-up and compiling each grammar. Medians over tokens;
``per token`` is mask + accept for one sequence; the step budget it is compared against is
this machine's own unconstrained decode step of the same model (``--step-ms``). Applying a
mask to the logits is the engine's own step, the same for every engine: ``zerostart bench
structured`` times it end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "role", "tags", "address", "score"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "role": "editor",
       "tags": ["math", "engines", "poetry of science"], "address": {"city": "London", "zip": "W1 1AA"},
       "score": 98.5}
OBJECT_DOC = {"answer": "Paris is the capital of France.", "confidence": 0.93, "sources": ["atlas", "wiki"],
              "nested": {"ok": True, "n": None}}
TOOL_ARGS = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
             "required": ["city", "unit"], "additionalProperties": False}
TOOL_DOC = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "c"}}\n</tool_call>'


def _workloads() -> dict[str, tuple[str, dict, str]]:
    # name -> (kind, schema, document text)
    return {"json_object": ("object", {"type": "object"}, json.dumps(OBJECT_DOC)),
            "json_schema": ("schema", SCHEMA, json.dumps(DOC)),
            "tool_call": ("tool", TOOL_ARGS, TOOL_DOC)}


# -- engines -------------------------------------------------------------------------------

class _LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int) -> None:
        import llguidance

        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
        self.executor = llguidance.LLExecutor()

    def compile(self, kind: str, schema: dict):
        ll = self.ll
        if kind == "tool":
            lark = ('start: "<tool_call>\\n" call "\\n</tool_call>"\n'
                    f'call: %json{json.dumps({"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": schema}, "required": ["name", "arguments"], "additionalProperties": False})}\n')
            return ll.LLMatcher.grammar_from_lark(lark)
        return ll.LLMatcher.grammar_from_json_schema(schema)

    def matcher(self, grammar):
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def fill(self, matchers, bitmask) -> None:
        # the calls zerostart makes (llguidance.torch's wrappers import dynamo, seconds)
        row = bitmask.shape[1] * 4
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), row)
        else:
            self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                                  row, len(matchers))

    def accept(self, matchers, token: int) -> None:
        for m in matchers:
            if not m.consume_token(token):
                raise RuntimeError(m.get_error())


class _XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer_json)
        model = json.loads(tokenizer_json)["model"]["vocab"]
        added = {t["id"]: t["content"] for t in json.loads(tokenizer_json)["added_tokens"]}
        inv = {i: t for t, i in model.items()} | added
        encoded = [inv.get(i, "") for i in range(vocab)]
        self.info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab, stop_token_ids=[eos],
                                      add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher()

    def compile(self, kind: str, schema: dict):
        if kind == "tool":
            call = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": schema},
                    "required": ["name", "arguments"], "additionalProperties": False}
            g = self.xgr.Grammar.concat(self.xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'),
                                        self.xgr.Grammar.from_json_schema(json.dumps(call)),
                                        self.xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'))
            return self.compiler.compile_grammar(g)
        return self.compiler.compile_json_schema(json.dumps(schema), strict_mode=False)

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matchers, token: int) -> None:
        for m in matchers:
            if not m.accept_token(token):
                raise RuntimeError("token refused")


class _OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int) -> None:
        import outlines_core
        from outlines_core.kernels.torch import fill_next_token_bitmask

        self.oc = outlines_core
        self._fill = fill_next_token_bitmask
        byte_of = _unicode_to_byte()
        spec = json.loads(tokenizer_json)
        special = {t["content"] for t in spec["added_tokens"] if t.get("special")}
        table: dict[bytes, list[int]] = {}
        for tok, i in spec["model"]["vocab"].items():
            if tok in special or i == eos:
                continue
            table.setdefault(bytes(byte_of[c] for c in tok), []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, table)

    def compile(self, kind: str, schema: dict):
        from outlines_core.json_schema import build_regex_from_schema

        if kind == "tool":
            call = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": schema},
                    "required": ["name", "arguments"], "additionalProperties": False}
            regex = "<tool_call>\\n" + build_regex_from_schema(json.dumps(call)) + "\\n</tool_call>"
        else:
            regex = build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, grammar):
        return self.oc.Guide(grammar)

    def fill(self, matchers, bitmask) -> None:
        for i, m in enumerate(matchers):
            self._fill(m, bitmask[i : i + 1])

    def accept(self, matchers, token: int) -> None:
        for m in matchers:
            m.advance(token)


ENGINES: dict[str, Callable[[str, int, int], Any]] = {
    "llguidance": _LLGuidance, "xgrammar": _XGrammar, "outlines-core": _OutlinesCore}
MODULES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}


def _unicode_to_byte() -> dict[str, int]:
    # GPT-2's printable stand-ins for bytes, inverted
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


# -- the walk ------------------------------------------------------------------------------

def _allowed(bitmask, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def _walk(engine, grammar, ids: list[int], batch: int, bitmask) -> dict:
    matchers = [engine.matcher(grammar) for _ in range(batch)]
    fills, accepts = [], []
    for step, tok in enumerate(ids):
        t0 = time.perf_counter()
        engine.fill(matchers, bitmask)
        t1 = time.perf_counter()
        for r in range(batch):
            if not _allowed(bitmask, r, tok):
                raise RuntimeError(f"token {tok} at step {step} (row {r}) refused by the mask")
        t2 = time.perf_counter()
        engine.accept(matchers, tok)
        t3 = time.perf_counter()
        fills.append(t1 - t0)
        accepts.append(t3 - t2)
    return {"fill_us": statistics.median(fills) * 1e6, "accept_us": statistics.median(accepts) * 1e6,
            "fill_mean_us": statistics.mean(fills) * 1e6, "tokens": len(ids)}


def _import_seconds(module: str) -> float:
    code = f"import time; t=time.perf_counter(); import {module}; print(time.perf_counter()-t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run(tokenizer_dir: str, engines: list[str], repeat: int) -> dict:
    import torch
    from tokenizers import Tokenizer

    path = os.path.join(tokenizer_dir, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        tokenizer_json = f.read()
    tk = Tokenizer.from_str(tokenizer_json)
    vocab = tk.get_vocab_size(with_added_tokens=True)
    cfg = json.load(open(os.path.join(tokenizer_dir, "tokenizer_config.json"), encoding="utf-8"))
    eos = tk.token_to_id(cfg["eos_token"] if isinstance(cfg["eos_token"], str) else cfg["eos_token"]["content"])
    if eos is None:
        raise SystemExit(f"{tokenizer_dir}: the eos token {cfg['eos_token']!r} is not in the tokenizer's vocabulary")
    rows = []
    for name in engines:
        row: dict = {"engine": name, "import_s": _import_seconds(MODULES[name])}
        t0 = time.perf_counter()
        eng = ENGINES[name](tokenizer_json, vocab, eos)
        row["tokenizer_s"] = time.perf_counter() - t0
        for wname, (kind, schema, text) in _workloads().items():
            ids = tk.encode(text, add_special_tokens=False).ids
            try:
                t0 = time.perf_counter()
                grammar = eng.compile(kind, schema)
                eng.matcher(grammar)  # some engines finish compiling in their first matcher
                compile_s = time.perf_counter() - t0
                for batch in (1, 16):
                    bitmask = torch.zeros(batch, (vocab + 31) // 32, dtype=torch.int32)
                    walks = [_walk(eng, grammar, ids, batch, bitmask) for _ in range(repeat)]
                    res = {k: statistics.median(w[k] for w in walks) for k in walks[0]}
                    rows.append({**row, "workload": wname, "batch": batch, "compile_ms": compile_s * 1e3, **res,
                                 "per_token_us": res["fill_us"] + res["accept_us"], "ok": True})
            except Exception as e:  # an engine that cannot run a workload is a row, not a crash
                rows.append({**row, "workload": wname, "batch": None, "ok": False, "error": f"{type(e).__name__}: {e}"})
    return {"vocab_size": vocab, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="model directory with tokenizer.json")
    p.add_argument("--engines", default="llguidance,xgrammar,outlines-core")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--step-ms", type=float, default=None, help="the model's unconstrained decode step, for the ratio")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    out = run(args.tokenizer, args.engines.split(","), args.repeat)
    out["uptime"] = open("/proc/loadavg").read().strip()
    out["step_ms"] = args.step_ms
    print(f"vocab {out['vocab_size']}; load {out['uptime']}")
    print(f"{'engine':14} {'import s':>8} {'tok s':>6} {'workload':12} {'batch':>5} {'compile ms':>10} "
          f"{'mask us':>8} {'accept us':>9} {'per token us':>12}" + (" {'% of step':>9}" if args.step_ms else ""))
    for r in out["rows"]:
        if not r["ok"]:
            print(f"{r['engine']:14} {r['import_s']:8.2f} {r['tokenizer_s']:6.2f} {r['workload']:12} failed: {r['error'][:80]}")
            continue
        line = (f"{r['engine']:14} {r['import_s']:8.2f} {r['tokenizer_s']:6.2f} {r['workload']:12} {r['batch']:5d} "
                f"{r['compile_ms']:10.1f} {r['fill_us']:8.1f} {r['accept_us']:9.1f} {r['per_token_us']:12.1f}")
        if args.step_ms:
            line += f" {100 * r['per_token_us'] / 1e3 / args.step_ms:9.1f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
