"""GGUF files for tests, written by the ``gguf`` package's own writer as llama.cpp's converter
writes them: llama.cpp tensor names, Q/K rows permuted, tensors quantized by ``gguf.quants``."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    base, suffix = hf.rsplit(".", 1)
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{suffix}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{_LAYER[rest]}.{suffix}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter (Hugging Face -> GGUF): each head's rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: str, cfg: dict, tensors: dict[str, torch.Tensor], tokenizer_dir: str, *,
               qtype: str = "F32", small_qtype: str = "F32", arch: str = "llama", pre: str = "default",
               extra: dict | None = None, skip: tuple[str, ...] = ()) -> str:
    """Write ``tensors`` (Hugging Face names, float) with ``cfg`` (a config.json dict) and the
    byte-level BPE tokenizer of ``tokenizer_dir`` as a GGUF file. 2-D weights are stored as
    ``qtype``, 1-D ones (norms) as ``small_qtype``; the package cannot quantize k-quants, so as
    those they are random blocks (with finite scales). ``skip``: metadata keys left out."""
    import gguf
    from gguf.quants import quantize

    w = gguf.GGUFWriter(path, arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    kv = {f"{arch}.block_count": cfg["num_hidden_layers"], f"{arch}.context_length": cfg["max_position_embeddings"],
          f"{arch}.embedding_length": cfg["hidden_size"], f"{arch}.feed_forward_length": cfg["intermediate_size"],
          f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
          f"{arch}.rope.dimension_count": cfg["hidden_size"] // heads}
    for key, value in kv.items():
        if key not in skip:
            w.add_uint32(key, value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", cfg.get("rope_theta", 10000.0))
    _tokenizer(w, tokenizer_dir, pre)
    for key, value in (extra or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    for name, t in tensors.items():
        data = t.detach().float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            data = permute(data, heads if "q_proj" in name else kv_heads)
        kind = gguf.GGMLQuantizationType[qtype if data.ndim == 2 else small_qtype]
        if kind.name.endswith("_K"):
            w.add_tensor(gguf_name(name), random_blocks(data.shape, kind.name), raw_dtype=kind)
        elif kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data))
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(name), data.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_SCALES = {"Q2_K": (-4, -2), "Q3_K": (-2,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,)}  # fp16 scales in a block


def random_blocks(shape: tuple[int, ...], qtype: str, seed: int = 0) -> np.ndarray:
    """Random k-quant blocks for a [rows, cols] tensor, their fp16 scales set to 0.01."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = np.random.default_rng(seed).integers(0, 256, size=(shape[0], shape[1] // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for off in _SCALES[qtype]:
        at = off % size
        blocks[:, at : at + 2] = scale
    return raw


def _tokenizer(w, tokenizer_dir: str, pre: str) -> None:
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        tok_cfg = json.load(f)
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_bos_token_id(vocab[tok_cfg["bos_token"]])
    w.add_eos_token_id(vocab[tok_cfg["eos_token"]])
    w.add_add_bos_token(True)
    w.add_chat_template(tok_cfg["chat_template"])


def random_llama(tiny_dir: str, seed: int = 0, **overrides):
    """A random transformers LlamaForCausalLM on the tiny demo's shape (with ``overrides``), and
    its config dict."""
    import transformers

    with open(os.path.join(tiny_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    return model, cfg
