"""Run inside vLLM's environment (by tests/plugins/test_vllm_loader.py): one vLLM engine on
CPU, its weights reloaded in place by each loader in turn, greedy outputs after each.

stdin: {"model": DIR, "other": DIR, "prompts": [...], "max_tokens": N,
        "steps": [{"format": "auto"|"zerostart", "extra": {...}, "path": DIR}, ...]}
stdout (last line): {"reference": [...], "steps": [{"outputs": [...], "seconds": s, "stats": {...}|null}]}

Each step reloads from its ``path`` with its load format and options (``update_config`` +
``reload_weights``, vLLM's own in-place reload), then generates greedily. ``reference`` is the
output of the engine as vLLM's default loader first built it.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker in this process: its loader's stats are readable

from vllm import LLM, SamplingParams  # noqa: E402

import zerostart.plugins.vllm._loader as zs_loader  # noqa: E402


def main() -> None:
    job = json.load(sys.stdin)
    llm = LLM(model=job["model"], enforce_eager=True, dtype="bfloat16", max_model_len=512, seed=0,
              kv_cache_memory_bytes=64 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=1)

    def generate() -> list[dict]:
        outs = llm.generate(job["prompts"], params, use_tqdm=False)
        return [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
                 "logprobs": [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs]} for o in outs]

    result = {"reference": generate(), "steps": []}
    for step in job["steps"]:
        llm.collective_rpc("update_config", args=({"load_config": {
            "load_format": step["format"], "model_loader_extra_config": step.get("extra", {})}},))
        zs_loader.last_stats = None
        t0 = time.perf_counter()
        error = None
        try:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": step["path"]})
        except Exception as e:  # the test asserts on the message of a load that must fail
            error = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        stats = zs_loader.last_stats.to_dict() if zs_loader.last_stats is not None else None
        result["steps"].append({"outputs": None if error else generate(), "seconds": seconds, "stats": stats,
                                "error": error})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
