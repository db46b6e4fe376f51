"""Typed configuration: the model's shape (from Hugging Face ``config.json``) and the engine's knobs.

Each default lives here, once. Both dataclasses validate on construction and name the bad
field in their errors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any

from zerostart.engine._errors import EngineError
from zerostart.names import KV_DTYPES, QUANTIZE_MODES, KvDtype, Quantize


def read_json_object(path: str) -> dict[str, Any]:
    """A model directory's JSON file (config, tokenizer or generation config) as a dict; an
    :class:`EngineError` naming the file if it is not valid UTF-8 JSON holding an object."""
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise EngineError(f"{path}: expected a JSON object")
    return raw


# architecture -> (q/k/v bias, o bias, q/k norm)
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    # yarn
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-family decoder, read from a Hugging Face ``config.json``."""

    family: str  # llama | mistral | qwen2 | qwen3
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    # per layer: the attention window (tokens a query may look back, itself included), or None
    sliding_windows: tuple[int | None, ...]
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_file(cls, path: str) -> "ModelShape":
        raw = read_json_object(path)
        try:
            return cls.from_dict(raw)
        except EngineError as e:
            raise EngineError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelShape":
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in _ARCHITECTURES), None)
        if arch is None:
            model_type = raw.get("model_type")
            arch = {v: k for k, v in _ARCHITECTURES.items()}.get(model_type) if isinstance(model_type, str) else None
        if arch is None:
            raise EngineError(f"unsupported architecture {archs or raw.get('model_type')!r}; "
                              f"supported: {', '.join(_ARCHITECTURES)}")
        family = _ARCHITECTURES[arch]

        def req_int(key: str) -> int:
            v = raw.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise EngineError(f"config key {key!r} must be a positive integer (got {v!r})")
            return v

        def opt(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
            v = raw.get(key, default)
            if v is None:
                return default
            if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
                raise EngineError(f"config key {key!r} has the wrong type (got {v!r})")
            return v

        hidden = req_int("hidden_size")
        heads = req_int("num_attention_heads")
        kv_heads = opt("num_key_value_heads", int, heads)
        head_dim = opt("head_dim", int, None)
        if head_dim is None:
            if hidden % heads:
                raise EngineError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
            head_dim = hidden // heads
        if kv_heads <= 0 or heads % kv_heads:
            raise EngineError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        if head_dim % 2:
            raise EngineError(f"head_dim {head_dim} must be even for rotary embeddings")
        if raw.get("hidden_act", "silu") not in ("silu", "swish"):
            raise EngineError(f"hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
        n_layers = req_int("num_hidden_layers")
        max_pos = opt("max_position_embeddings", int, 4096)

        attention_bias = bool(opt("attention_bias", bool, False))
        qkv_bias = True if family == "qwen2" else attention_bias
        o_bias = False if family == "qwen2" else attention_bias
        mlp_bias = bool(opt("mlp_bias", bool, False)) if family == "llama" else False

        windows = _sliding_windows(raw, family, n_layers)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        bos = raw.get("bos_token_id")
        return cls(
            family=family, architecture=arch,
            vocab_size=req_int("vocab_size"), hidden_size=hidden, intermediate_size=req_int("intermediate_size"),
            num_layers=n_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(opt("rms_norm_eps", (int, float), 1e-6)),
            rope=_rope_config(raw, max_pos),
            tie_word_embeddings=bool(opt("tie_word_embeddings", bool, False)),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, qk_norm=family == "qwen3",
            sliding_windows=windows, bos_token_id=bos if isinstance(bos, int) else None, eos_token_ids=eos_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )


def _sliding_windows(raw: dict[str, Any], family: str, n_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise EngineError(f"config key 'sliding_window' must be a positive integer or null (got {window!r})")
    if family == "llama":
        return (None,) * n_layers
    if family == "mistral":
        return (window,) * n_layers
    # Qwen2/Qwen3: the window applies only when use_sliding_window is set, to the layers that
    # layer_types marks (by default those from max_window_layers on).
    if not raw.get("use_sliding_window", False):
        window = None
    layer_types = raw.get("layer_types")
    if layer_types is None:
        first = raw.get("max_window_layers", 28)
        return tuple(window if window is not None and i >= first else None for i in range(n_layers))
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise EngineError(f"config key 'layer_types' must list one type per layer ({n_layers})")
    out = []
    for i, t in enumerate(layer_types):
        if t not in ("full_attention", "sliding_attention"):
            raise EngineError(f"config key 'layer_types'[{i}] = {t!r} is not supported")
        out.append(window if t == "sliding_attention" else None)
    return tuple(out)


def _rope_config(raw: dict[str, Any], max_pos: int) -> RopeConfig:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise EngineError(f"config key 'rope_scaling' must be an object (got {params!r})")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise EngineError(f"rope type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise EngineError("partial_rotary_factor other than 1.0 is not supported")
    orig = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_pos))

    def num(key: str, default: Any) -> Any:
        v = params.get(key, default)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise EngineError(f"rope parameter {key!r} must be a number (got {v!r})")
        return v

    factor = num("factor", 1.0)
    if rope_type in ("linear", "llama3") and params.get("factor") is None:
        raise EngineError(f"rope type {rope_type!r} needs a 'factor'")
    if rope_type == "yarn" and factor is None:
        factor = max_pos / orig
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                raise EngineError(f"rope type 'llama3' needs {key!r}")
    return RopeConfig(
        rope_type=rope_type, theta=float(theta), factor=float(factor),
        low_freq_factor=float(num("low_freq_factor", 1.0)), high_freq_factor=float(num("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig),
        attention_factor=num("attention_factor", None),
        beta_fast=float(num("beta_fast", None) or 32.0), beta_slow=float(num("beta_slow", None) or 1.0),
        mscale=num("mscale", None), mscale_all_dim=num("mscale_all_dim", None),
        truncate=bool(params.get("truncate", True)),
    )


@dataclass
class EngineConfig:
    """How the engine runs a model. Every field has its one default here.

    - ``max_model_len``: longest sequence (prompt + completion) in tokens; None = the model's
      ``max_position_embeddings``, capped at 8192 (each batch slot reserves this many tokens).
    - ``max_num_seqs``: sequences decoded together (KV cache slots); fewer if the budget is smaller.
    - ``kv_cache_bytes``: the KV cache budget; None = on CPU 2 GiB, on CUDA ``gpu_memory_utilization``
      of the device's memory minus what is in use after the weights load.
    - ``prefill_chunk``: prompt tokens prefilled per step (longer prompts take several steps, so
      running decodes keep flowing; every step's length is every running request's gap between
      two tokens); None = 256 on CPU, 512 on CUDA (``for_device``).
    - ``cuda_graphs``: capture decode steps as CUDA graphs, one per batch-size bucket (CUDA only).
    - ``compile``: ``torch.compile`` the decode step.
    - ``fuse``: "auto" fuses q/k/v and gate/up where the weights already sit back to back in the
      arena, or can be regrouped in place (device memory, or a CPU arena marked ``writable``);
      "always" also regroups any CPU arena in place (not for arenas that map a read-only file);
      "never" keeps them apart.
    - ``seed``: seed of the generator for requests without their own seed (None = nondeterministic).
    - ``overlap_load``: assemble and warm up the model while the weights are still arriving
      (each layer waits for its own tensors); off, the whole load finishes first.
    - ``quantize``: how matrices are held. "auto": as stored (a GGUF file's quantized matrices
      stay quantized, floats stay floats); "none": all floats (GGUF quants dequantized at load);
      "int8" / "int4": float matrices quantized at load (groups of 32; the embeddings and LM
      head at 8 bits), quantized GGUF matrices kept as stored. A ready image holds the result.
    - ``kv_dtype``: the KV cache's dtype. "auto": the activations', except on CPU for float32
      activations over quantized matrices, whose cache is bfloat16 (half the bytes to hold and
      read); "float32" / "bfloat16" / "float16" (CUDA only): that dtype, whatever the activations
      (attention computes in the activations' dtype; keys and values round as they are written).
    - ``threads``: on CPU, torch's intra-op threads for this process (``torch.set_num_threads``);
      None leaves torch's setting alone. A server's workers get theirs from the cores available
      and the workers sharing them (``models[].threads`` in the server config).
    """

    max_model_len: int | None = None
    max_num_seqs: int = 32
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    prefill_chunk: int | None = None
    cuda_graphs: bool = True
    compile: bool = False
    fuse: str = "auto"
    seed: int | None = None
    overlap_load: bool = True
    quantize: Quantize = "auto"
    kv_dtype: KvDtype = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        def pos_int(name: str, v: Any, allow_none: bool = False) -> None:
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise EngineError(f"EngineConfig.{name} must be a positive integer (got {v!r})")

        pos_int("max_model_len", self.max_model_len, allow_none=True)
        pos_int("max_num_seqs", self.max_num_seqs)
        pos_int("kv_cache_bytes", self.kv_cache_bytes, allow_none=True)
        pos_int("prefill_chunk", self.prefill_chunk, allow_none=True)
        pos_int("threads", self.threads, allow_none=True)
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise EngineError(f"EngineConfig.gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization!r})")
        if self.fuse not in ("auto", "always", "never"):
            raise EngineError(f"EngineConfig.fuse must be 'auto', 'always' or 'never' (got {self.fuse!r})")
        if self.quantize not in QUANTIZE_MODES:
            raise EngineError(f"EngineConfig.quantize must be one of {', '.join(QUANTIZE_MODES)} (got {self.quantize!r})")
        if self.kv_dtype not in KV_DTYPES:
            raise EngineError(f"EngineConfig.kv_dtype must be one of {', '.join(KV_DTYPES)} (got {self.kv_dtype!r})")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise EngineError(f"EngineConfig.seed must be an integer or None (got {self.seed!r})")
        for name in ("cuda_graphs", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise EngineError(f"EngineConfig.{name} must be true or false (got {getattr(self, name)!r})")

    def for_device(self, device_type: str) -> "EngineConfig":
        """This config with the defaults that depend on the device filled in."""
        if self.prefill_chunk is not None:
            return self
        return replace(self, prefill_chunk=PREFILL_CHUNK.get(device_type, PREFILL_CHUNK["cpu"]))


MAX_MODEL_LEN_CAP = 8192  # default cap on max_model_len (see EngineConfig)
# Default prefill_chunk. CPU: on SmolLM2-135M (bfloat16, one thread) a 4,096-token prompt prefilled
# at 85 / 89 / 95 / 93 tokens/s in chunks of 128 / 256 / 512 / 1024 while the longest step took
# 2.3 / 4.2 / 8.7 / 15.7 s (docs/engine.md, "Scheduling"): 256 halves what everyone decoding beside
# a long prompt waits between tokens for about 6 % of its prefill speed. CUDA: unchanged, unmeasured.
PREFILL_CHUNK = {"cpu": 256, "cuda": 512}
CPU_KV_CACHE_BYTES = 2 << 30  # default KV budget on CPU (see EngineConfig)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, bounded by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def find_file(model_dir: str, name: str, required: bool = True) -> str | None:
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
        return path
    if required:
        raise EngineError(f"{model_dir}: no {name} here (a Hugging Face model directory needs one)")
    return None
