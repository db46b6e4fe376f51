"""Generated benchmark checkpoints: random bf16 tensors with the shapes of a Llama layer stack,
sharded and indexed as Hugging Face writes them. Cached by size and seed; written atomically
(a half-written checkpoint is never reused)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable

def shapes(size: int) -> tuple[list[tuple[str, tuple[int, ...]]], dict]:
    """Tensor names and shapes of a Llama-style stack of about ``size`` bytes in bf16."""
    if size >= 1 << 30:
        hidden, inter, kv, vocab = 2048, 8192, 512, 32000
    elif size >= 96 << 20:
        hidden, inter, kv, vocab = 1024, 4096, 256, 32000
    else:
        hidden, inter, kv, vocab = 256, 1024, 64, 4096
    per_layer = 2 * (hidden * hidden * 2 + 2 * kv * hidden + 3 * hidden * inter + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((size - fixed) / per_layer))
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out, {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab}


def ensure(work_dir: str, size: int, seed: int = 0, shard_bytes: int = 1 << 30, log: Callable[[str], None] = print) -> str:
    """The directory of a generated checkpoint of about ``size`` bytes (created if missing)."""
    name = f"llama-bf16-{size}-seed{seed}"
    out = os.path.join(work_dir, name)
    if os.path.exists(os.path.join(out, ".complete")):
        return out
    # torch only when the benchmark runs, not at the command's start
    import torch

    # the engine's torch names: only when the benchmark runs, not at the command's start
    from zerostart.weights import save_file

    os.makedirs(work_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=work_dir)
    try:
        specs, dims = shapes(size)
        g = torch.Generator().manual_seed(seed)
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        acc = 0
        for n, s in specs:
            nbytes = 2 * _numel(s)
            if shards[-1] and acc + nbytes > shard_bytes:
                shards.append([])
                acc = 0
            shards[-1].append((n, s))
            acc += nbytes
        weight_map = {}
        total = 0
        for i, group in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            log(f"  generating {fname} ({sum(2 * _numel(s) for _, s in group) / 1e9:.2f} GB)")
            tensors = {n: torch.randn(s, generator=g, dtype=torch.bfloat16) for n, s in group}
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n, _ in group})
            total += sum(t.numel() * 2 for t in tensors.values())
            del tensors
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", **dims}, f, indent=2)
        open(os.path.join(tmp, ".complete"), "w").close()
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def describe(path: str) -> str:
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    return f"{c['num_hidden_layers']} layers of hidden {c['hidden_size']}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
