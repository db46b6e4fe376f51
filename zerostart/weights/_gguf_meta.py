"""A GGUF file's metadata as a Hugging Face model directory's files.

    general.architecture, <arch>.*     -> config.json, generation_config.json
    tokenizer.ggml.* (BPE "gpt2")      -> tokenizer.json (the ``tokenizers`` library's format)
    tokenizer.chat_template, token ids -> tokenizer_config.json

Keys follow llama.cpp's ``gguf-py/gguf/constants.py``. A key that is missing, of the wrong
type or of a value zerostart cannot honour is an error naming the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from zerostart.weights._errors import WeightsError


@dataclass(frozen=True)
class Architecture:
    hf_architecture: str
    model_type: str
    permute_qk: bool  # llama.cpp's converter permuted Q/K rows for its rotary layout


ARCHITECTURES = {"llama": Architecture("LlamaForCausalLM", "llama", True)}

# tokenizer.ggml.pre -> the pre-tokenizer of the original Hugging Face tokenizer
_GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_THEN_BYTES = [{"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                     {**_GPT2, "use_regex": False}]
PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    "default": [_GPT2], "gpt-2": [_GPT2], "gpt2": [_GPT2],
    "smollm": [_DIGITS, _GPT2], "starcoder": [_DIGITS, _GPT2], "refact": [_DIGITS, _GPT2],
    "llama-bpe": _SPLIT_THEN_BYTES, "llama3": _SPLIT_THEN_BYTES,
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of added tokens


class Metadata:
    """Typed access to a reader's key-value pairs; errors name the file and the key."""

    def __init__(self, path: str, reader) -> None:
        self.path = path
        self.fields = reader.fields
        self.architecture = self.string("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise WeightsError(f"{path}: general.architecture is {self.architecture!r}, which zerostart does not run "
                               f"(supported: {', '.join(ARCHITECTURES)})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        f = self.fields.get(key)
        if f is None:
            if default is ...:
                raise WeightsError(f"{self.path}: metadata key {key!r} is missing")
            return default
        value = field_value(self.path, key, f)
        if isinstance(value, list) and kind is not list:
            if len(set(value)) != 1:
                raise WeightsError(f"{self.path}: metadata key {key!r} varies per layer ({value[:4]}...); "
                                   "zerostart needs one value for every layer")
            value = value[0]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
            raise WeightsError(f"{self.path}: metadata key {key!r} has the wrong type ({type(value).__name__}: "
                               f"{str(value)[:60]!r})")
        return value

    def string(self, key: str, default: Any = ...) -> Any:
        return self.get(key, str, default)

    def integer(self, key: str, default: Any = ...) -> Any:
        v = self.get(key, int, default)
        if v is not None and v is not default and v <= 0:
            raise WeightsError(f"{self.path}: metadata key {key!r} must be positive (got {v})")
        return v

    def number(self, key: str, default: Any = ...) -> Any:
        v = self.get(key, (int, float), default)
        return None if v is None else float(str(np.float32(v)))  # the float32 as written (1e-05, not 9.99e-06)

    def arch(self, key: str) -> str:
        return f"{self.architecture}.{key}"


def field_value(path: str, key: str, field) -> Any:
    """A field's value; the reader decodes strings only now, so bytes that are not UTF-8 fail
    here: a WeightsError naming the file and the key."""
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as e:
        raise WeightsError(f"{path}: metadata key {key!r} cannot be read ({type(e).__name__}: {e})") from None


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def config(meta: Metadata, tensors) -> dict[str, Any]:
    """``config.json`` of the model (Llama family)."""
    a = ARCHITECTURES[meta.architecture]
    names = {t.name: t for t in tensors}
    hidden, heads = meta.integer(meta.arch("embedding_length")), meta.integer(meta.arch("attention.head_count"))
    head_dim = meta.integer(meta.arch("attention.key_length"), hidden // heads)
    rope_dim = meta.integer(meta.arch("rope.dimension_count"), head_dim)
    if rope_dim != head_dim:
        raise WeightsError(f"{meta.path}: metadata key {meta.arch('rope.dimension_count')!r} is {rope_dim}, not the "
                           f"head size {head_dim}: partial rotary embeddings are not supported")
    embed = names.get("model.embed_tokens.weight")
    if embed is None:
        raise WeightsError(f"{meta.path}: tensor 'token_embd.weight' (the embeddings) is missing")
    cfg: dict[str, Any] = {
        "architectures": [a.hf_architecture], "model_type": a.model_type,
        "hidden_size": hidden, "intermediate_size": meta.integer(meta.arch("feed_forward_length")),
        "num_hidden_layers": meta.integer(meta.arch("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": meta.integer(meta.arch("attention.head_count_kv"), heads), "head_dim": head_dim,
        "max_position_embeddings": meta.integer(meta.arch("context_length"), 4096),
        "rms_norm_eps": meta.number(meta.arch("attention.layer_norm_rms_epsilon"), 1e-5),
        "rope_theta": meta.number(meta.arch("rope.freq_base"), 10000.0),
        "vocab_size": embed.shape[0], "hidden_act": "silu",
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in names, "mlp_bias": False,
        "tie_word_embeddings": "lm_head.weight" not in names,
        "torch_dtype": "bfloat16",
    }
    scaling = _rope_scaling(meta, cfg["max_position_embeddings"])
    if scaling:
        cfg["rope_scaling"] = scaling
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        v = meta.get(f"tokenizer.ggml.{name}", int, None)
        if v is not None:
            cfg[key] = v
    return cfg


def _rope_scaling(meta: Metadata, max_pos: int) -> dict[str, Any] | None:
    kind = meta.string(meta.arch("rope.scaling.type"), "none")
    if kind == "none":
        return None
    factor = meta.number(meta.arch("rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = meta.integer(meta.arch("rope.scaling.original_context_length"), max_pos)
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    raise WeightsError(f"{meta.path}: metadata key {meta.arch('rope.scaling.type')!r} is {kind!r} "
                       "(supported: none, linear, yarn)")


def tokenizer(meta: Metadata) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``tokenizer.json``, ``tokenizer_config.json``) of the embedded byte-level BPE tokenizer."""
    kind = meta.string("tokenizer.ggml.model")
    if kind != "gpt2":
        raise WeightsError(f"{meta.path}: metadata key 'tokenizer.ggml.model' is {kind!r}; zerostart converts "
                           "byte-level BPE tokenizers ('gpt2') only")
    pre = meta.string("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise WeightsError(f"{meta.path}: metadata key 'tokenizer.ggml.pre' is {pre!r}, a pre-tokenizer zerostart "
                           f"does not know (known: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = meta.get("tokenizer.ggml.tokens", list)
    merges = meta.get("tokenizer.ggml.merges", list)
    types = meta.get("tokenizer.ggml.token_type", list, [1] * len(tokens))
    if len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise WeightsError(f"{meta.path}: metadata keys 'tokenizer.ggml.tokens' and 'tokenizer.ggml.token_type' "
                           f"disagree ({len(tokens)} tokens, {len(types)} types)")
    pairs = []
    for i, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2:
            raise WeightsError(f"{meta.path}: metadata key 'tokenizer.ggml.merges'[{i}] is {m!r}, not two tokens")
        pairs.append(parts)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == _CONTROL} for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (_CONTROL, _USER_DEFINED)]
    steps = PRE_TOKENIZERS[pre]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": {t: i for i, t in enumerate(tokens)}, "merges": pairs}}
    if meta.get("tokenizer.ggml.add_bos_token", bool, False):
        bos = tokens[meta.get("tokenizer.ggml.bos_token_id", int)]
        tok["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                 {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                 {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                 "special_tokens": {bos: {"id": bos, "ids": [tokens.index(bos)], "tokens": [bos]}}}
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", bool, False)),
                           "model_max_length": meta.integer(meta.arch("context_length"), 4096)}
    for key in ("bos", "eos", "unknown", "padding"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id", int, None)
        if i is not None:
            if not 0 <= i < len(tokens):
                raise WeightsError(f"{meta.path}: metadata key 'tokenizer.ggml.{key}_token_id' is {i}, outside the "
                                   f"vocabulary of {len(tokens)}")
            cfg[{"unknown": "unk", "padding": "pad"}.get(key, key) + "_token"] = tokens[i]
    template = meta.string("tokenizer.chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    return tok, cfg


def write_files(meta: Metadata, tensors, out: str) -> None:
    """config.json, generation_config.json, tokenizer.json and tokenizer_config.json into ``out``."""
    cfg = config(meta, tensors)
    tok, tok_cfg = tokenizer(meta)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    eot = meta.get("tokenizer.ggml.eot_token_id", int, None)
    if eot is not None and eot != gen.get("eos_token_id"):
        gen["eos_token_id"] = [gen["eos_token_id"], eot] if "eos_token_id" in gen else eot
    for name, obj in (("config.json", cfg), ("generation_config.json", gen), ("tokenizer.json", tok),
                      ("tokenizer_config.json", tok_cfg)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1 if name != "tokenizer.json" else None, ensure_ascii=False)
            f.write("\n")
