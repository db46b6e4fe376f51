"""Names every package shares: devices, dtypes, ready-image modes and source schemes.

The torch-free leaf of the house (DESIGN.md §3): it imports nothing of zerostart and nothing
heavy, so the gateway, the config, the workers, the loaders and the engine all read one
definition of each name::

    >>> normalize_device("CUDA"), dtype_name("bf16"), source_scheme("s3://bucket/llama")
    ('cuda:0', 'bfloat16', <Scheme.S3: 's3'>)

A name that validates here is one every loader accepts: a config that passes its schema does
not fail later for a device or dtype the engine rejects.
"""

from __future__ import annotations

import enum
import functools
import os
import re
from typing import Literal, get_args

__all__ = [
    "DEFAULT_IMAGE_MODE",
    "DEVICE_TYPES",
    "DTYPES",
    "DTYPE_BYTES",
    "IMAGE_MODES",
    "Dtype",
    "ImageMode",
    "Scheme",
    "cpu_has_bf16",
    "default_dtype",
    "device_type",
    "dtype_name",
    "is_local",
    "is_remote",
    "normalize_device",
    "source_scheme",
]

# -- devices ----------------------------------------------------------------------------------

DEVICE_TYPES = ("cpu", "cuda")  # what the engine runs on (torch.device types)
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_DEVICE_HELP = "use cpu, cuda or cuda:N"


def device_type(device: str) -> str:
    """``cpu`` or ``cuda`` for a device name (``cpu``, ``cuda``, ``cuda:N``; any case, spaces
    ignored). Raises ``ValueError`` naming the accepted names for anything else."""
    d = str(device).strip().lower()
    if not _DEVICE.match(d):
        raise ValueError(f"unknown device {device!r} ({_DEVICE_HELP})")
    return d.split(":", 1)[0]


def normalize_device(device: str) -> str:
    """The canonical name of a device: ``cpu`` or ``cuda:N`` (plain ``cuda`` means ``cuda:0``).
    Raises ``ValueError`` like :func:`device_type`."""
    device_type(device)
    d = str(device).strip().lower()
    return "cuda:0" if d == "cuda" else d


# -- dtypes -----------------------------------------------------------------------------------

Dtype = Literal["float32", "bfloat16", "float16"]  # the dtypes the engine holds weights in
DTYPES: tuple[str, ...] = get_args(Dtype)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def dtype_name(dtype: str) -> str:
    """The canonical name (``float32``, ``bfloat16``, ``float16``) of a dtype written as one of
    them, a ``torch.`` name, or an alias (``fp32``, ``float``, ``fp16``, ``half``, ``bf16``).
    Raises ``ValueError`` naming the accepted names."""
    s = str(dtype).strip().removeprefix("torch.")
    s = _DTYPE_ALIASES.get(s.lower(), s)
    if s not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16, or fp32, fp16, half, bf16)")
    return s


def default_dtype(device_type: str, checkpoint_dtype: str | None = None) -> str:
    """The dtype the engine loads weights in when none is asked for.

    On CPU: bfloat16 when the checkpoint is bfloat16 and the CPU computes it natively
    (:func:`cpu_has_bf16`): half the bytes to read, map, park and hold, and on SmolLM2-135M
    decoding and prefill measured faster than in float32 (docs/engine.md, "bfloat16 on CPU");
    else float32 (emulated half-precision matmuls are slow, and float16 is less exact). On
    accelerators: the checkpoint's float16, else bfloat16."""
    if device_type == "cpu":
        return "bfloat16" if checkpoint_dtype == "bfloat16" and cpu_has_bf16() else "float32"
    return "float16" if checkpoint_dtype == "float16" else "bfloat16"


_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX-512 BF16, AMX), arm64 (FEAT_BF16)


def cpu_has_bf16() -> bool:
    """Whether this machine's CPU has bfloat16 arithmetic (``/proc/cpuinfo`` flags: avx512_bf16 or
    amx_bf16 on x86, bf16 on arm64). ``ZEROSTART_CPU_BF16=0`` (or ``1``) overrides the answer."""
    forced = os.environ.get("ZEROSTART_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return _cpuinfo_bf16()


@functools.lru_cache(maxsize=1)
def _cpuinfo_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("flags", "Features"))]
    except OSError:
        return False
    return any(_BF16_FLAGS & set(line.split(":", 1)[-1].split()) for line in lines)


# -- ready-image modes ------------------------------------------------------------------------

# off: never look for a ready image; use: restore a matching one; write: use, and write one in
# the background after a load from the source (DESIGN.md §2)
ImageMode = Literal["off", "use", "write"]
IMAGE_MODES: tuple[str, ...] = get_args(ImageMode)
DEFAULT_IMAGE_MODE: ImageMode = "write"


# -- source schemes ---------------------------------------------------------------------------


class Scheme(str, enum.Enum):
    """Where a model's checkpoint comes from. A scheme says how bytes are reached, not what
    they hold: a local ``.gguf`` file, a safetensors directory and a ready image are all
    ``LOCAL`` (the weights package tells the formats apart)."""

    LOCAL = "local"  # a path on this machine
    HF = "hf"  # hf://org/name[@revision]: the Hugging Face cache (or hub)
    S3 = "s3"  # s3://bucket/prefix
    HTTP = "http"  # http:// or https:// under which the Hugging Face file names can be fetched


_PREFIXES = {"hf://": Scheme.HF, "s3://": Scheme.S3, "http://": Scheme.HTTP, "https://": Scheme.HTTP}


def source_scheme(spec: str) -> Scheme:
    """The scheme of a model source. Raises ``ValueError`` for a URL of a scheme zerostart
    does not read (``ftp://...``)."""
    scheme = _scheme(spec)
    if scheme is None:
        raise ValueError(f"{spec!r}: unknown source scheme (use a path, hf://org/name, s3://bucket/prefix "
                         "or https://...)")
    return scheme


def is_local(spec: str) -> bool:
    """Whether a source is a path on this machine (a directory, a file, a ready image)."""
    return _scheme(spec) is Scheme.LOCAL


def is_remote(spec: str) -> bool:
    """Whether a source is fetched over the network into the local cache (s3, http, https)."""
    return _scheme(spec) in (Scheme.S3, Scheme.HTTP)


def _scheme(spec: str) -> Scheme | None:
    for prefix, scheme in _PREFIXES.items():
        if spec.startswith(prefix):
            return scheme
    return None if "://" in spec else Scheme.LOCAL
