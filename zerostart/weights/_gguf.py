"""GGUF files (llama.cpp's format) as a source, in the Hugging Face layout the engine knows.

A ``.gguf`` file holds a whole model: metadata (architecture, shape, tokenizer, chat template)
and tensors, most of them quantized. It is read with the ``gguf`` package, the format's
reference library, and presented as a Hugging Face checkpoint:

- metadata -> ``config.json`` and ``generation_config.json``; the embedded tokenizer ->
  ``tokenizer.json`` and ``tokenizer_config.json`` with the chat template (``_gguf_meta.py``);
- tensors -> Hugging Face names (``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.q_proj.weight``),
  in layer order with q/k/v and gate/up back to back (so the engine fuses them for free),
  with llama.cpp's row permutation of Q and K undone, and dequantized into the load's arena
  (``_gguf_load.py``).

Parsing a GGUF header takes seconds for a large vocabulary, so what it yields is written once
per file (by its identity: size, modification and change times, inode) into
``<cache_dir>/gguf/<key>/``: the files above and ``gguf-tensors.json``, the tensor table. A
changed file gets a new directory. Malformed files get a :class:`WeightsError` naming the file
and the key or tensor at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

from zerostart.weights._errors import WeightsError
from zerostart.weights._paths import cache_dir
from zerostart.weights._store_local import file_identity

MAGIC = b"GGUF"
TABLE = "gguf-tensors.json"
TABLE_VERSION = 1
# Quantization types dequantized by the gguf package (others are refused by name, up front).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp names -> Hugging Face names (the .weight / .bias suffix is kept)
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LAYER_ORDER = list(_LAYER)  # within a layer: norm, q, k, v, o, norm, gate, up, down


@dataclass(frozen=True)
class GgufTensor:
    name: str  # Hugging Face name
    gguf_name: str
    qtype: str  # the GGML type's name (F32, Q4_1, ...)
    shape: tuple[int, ...]  # torch order (rows first)
    offset: int  # absolute file offset of the data
    nbytes: int  # stored bytes
    heads: int = 0  # > 0: undo llama.cpp's Q/K row permutation over this many heads

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GgufModel:
    path: str
    identity: str  # the file's identity when its table was written
    dir: str  # the Hugging Face layout of its metadata: config.json, tokenizer files, the tensor table
    tensors: tuple[GgufTensor, ...]  # in load order

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)


def is_gguf(path: str) -> bool:
    """Whether ``path`` is a file that says it is GGUF (its name or its first four bytes)."""
    if not os.path.isfile(path):
        return False
    if path.endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def open_gguf(path: str) -> GgufModel:
    """The model in a GGUF file, its Hugging Face layout written to the cache if not there yet."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    ident = file_identity(st)
    d = os.path.join(cache_dir(), "gguf", hashlib.sha256(f"{path}\n{ident}".encode()).hexdigest()[:24])
    model = _read_table(path, ident, d)
    if model is None:
        _derive(path, d)
        model = _read_table(path, ident, d)
        if model is None:
            raise WeightsError(f"{path}: its tensor table in {d} could not be read back")
    return model


def _read_table(path: str, ident: str, d: str) -> GgufModel | None:
    try:
        with open(os.path.join(d, TABLE), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    if raw.get("version") != TABLE_VERSION or raw.get("identity") != ident:
        return None
    tensors = tuple(GgufTensor(**{**t, "shape": tuple(t["shape"])}) for t in raw["tensors"])
    return GgufModel(path, ident, d, tensors)


def _derive(path: str, d: str) -> None:
    """Parse the file and write its Hugging Face layout into ``d`` (atomically)."""
    # numpy (and gguf) only when a GGUF file is read: the gateway imports this package's face
    from zerostart.weights import _gguf_meta

    reader = read(path)
    ident = file_identity(os.stat(path))
    meta = _gguf_meta.Metadata(path, reader)
    tensors = table(path, reader, meta.architecture)
    parent = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(d)}.tmp-", dir=parent)
    try:
        _gguf_meta.write_files(meta, tensors, tmp)
        with open(os.path.join(tmp, TABLE), "w", encoding="utf-8") as f:
            json.dump({"version": TABLE_VERSION, "source": path, "identity": ident,
                       "tensors": [asdict(t) for t in tensors]}, f, indent=1)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, d)
        except OSError:  # another process wrote it first; or a stale copy is in the way
            if _read_table(path, ident, d) is None:
                shutil.rmtree(d, ignore_errors=True)
                os.rename(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read(path: str):
    """A ``gguf.GGUFReader`` over ``path``; a WeightsError naming the file for a malformed one."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise WeightsError(f"{path}: not a GGUF file (it starts with {head!r}; a GGUF file starts with {MAGIC!r})")
    # numpy (and gguf) only when a GGUF file is read: the gateway imports this package's face
    from zerostart.weights._gguf_reader import Reader

    try:
        return Reader(path)
    except WeightsError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: malformed GGUF header ({type(e).__name__}: {e})") from None


def table(path: str, reader, architecture: str) -> tuple[GgufTensor, ...]:
    """The tensors under Hugging Face names, in load order; errors name the tensor."""
    # numpy (and gguf) only when a GGUF file is read: the gateway imports this package's face
    from zerostart.weights._gguf_meta import ARCHITECTURES

    permute = ARCHITECTURES[architecture].permute_qk
    heads = _int_field(reader, f"{architecture}.attention.head_count")
    kv_heads = _int_field(reader, f"{architecture}.attention.head_count_kv") or heads
    out = []
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise WeightsError(f"{path}: tensor {t.name!r} is {qtype}, which zerostart cannot dequantize "
                               f"(supported: {', '.join(SUPPORTED_TYPES)})")
        name = hf_name(t.name)
        if name is None:
            raise WeightsError(f"{path}: tensor {t.name!r} has no counterpart in a Hugging Face "
                               f"{ARCHITECTURES[architecture].hf_architecture} (architecture {architecture!r})")
        n_heads = 0
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            n_heads = heads if "q_proj" in name else kv_heads
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out.append(GgufTensor(name, t.name, qtype, shape, int(t.data_offset), int(t.n_bytes), n_heads))
    return tuple(sorted(out, key=_order))


def hf_name(gguf_name: str) -> str | None:
    base, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER:
        return f"model.layers.{int(parts[1])}.{_LAYER[parts[2]]}.{suffix}"
    return None


def _order(t: GgufTensor) -> tuple[int, int, int, str]:
    parts = t.gguf_name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), _LAYER_ORDER.index(parts[2]), parts[-1])
    return ({"token_embd": 0, "output_norm": 2, "output": 3}[parts[0]], 0, 0, parts[-1])


def _int_field(reader, key: str) -> int:
    f = reader.fields.get(key)
    if f is None:
        return 0
    # numpy (and gguf) only when a GGUF file is read: the gateway imports this package's face
    from zerostart.weights._gguf_meta import field_value

    v = field_value(reader.path, key, f)
    try:
        return int(v) if not isinstance(v, list) else int(v[0])
    except (TypeError, ValueError, IndexError):
        raise WeightsError(f"{reader.path}: metadata key {key!r} is not an integer ({str(v)[:60]!r})") from None
