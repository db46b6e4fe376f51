"""Names every package shares: devices, dtypes, ready-image modes, source schemes and the
rungs of the cold ladder.

The torch-free leaf of the house (docs/design.md, "The house"): it imports nothing of zerostart
and nothing heavy, so the gateway, the config, the workers, the loaders, the engine, the
policies and the simulator all read one definition of each name::

    >>> normalize_device("CUDA"), dtype_name("bf16"), source_scheme("s3://bucket/llama")
    ('cuda:0', 'bfloat16', <Scheme.S3: 's3'>)
    >>> Climb.STANDBY_IMAGE.rung, Climb.of(Rung.ZERO, standby=True).value
    (<Rung.IMAGE: 'image'>, 'standby+source')

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
    "LADDER",
    "KV_DTYPES",
    "QUANTIZE_MODES",
    "Climb",
    "Dtype",
    "ImageMode",
    "KvDtype",
    "Quantize",
    "Rung",
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
# the background after a load from the source (docs/ladder.md)
ImageMode = Literal["off", "use", "write"]
IMAGE_MODES: tuple[str, ...] = get_args(ImageMode)
DEFAULT_IMAGE_MODE: ImageMode = "write"


# -- how matrices are held --------------------------------------------------------------------

# auto: as stored (a GGUF file's quantized matrices stay quantized, floats stay floats); none:
# all floats (GGUF quants dequantized at load); int8 / int4: float matrices quantized at load
Quantize = Literal["auto", "none", "int8", "int4"]
QUANTIZE_MODES: tuple[str, ...] = get_args(Quantize)

# the KV cache's dtype. auto: the activations' (bfloat16 on CPU for float32 activations over
# quantized matrices, as llama.cpp keeps an f16 cache); else that dtype (float16: CUDA only)
KvDtype = Literal["auto", "float32", "bfloat16", "float16"]
KV_DTYPES: tuple[str, ...] = get_args(KvDtype)


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


# -- the cold ladder --------------------------------------------------------------------------


class Rung(enum.StrEnum):
    """Where a model rests; lower rungs cost less to hold and more to climb (docs/design.md,
    "The cold ladder"). The value is the name everything shows: policy specs, status, metrics,
    the simulator's tables. (A climb from ZERO loads the source: its :class:`Climb` is ``source``.)

      HOT    -> PARKED  release device memory, keep the worker and its graphs
      PARKED -> IMAGE   stop the worker; the ready image stays on local disk
      IMAGE  -> ZERO    nothing to do but forget (the source checkpoint stays where it is)
      any    -> HOT     a climb: wake, restore the image, or load the source
    """

    __hash__ = str.__hash__  # as its value: a dict keyed by rungs answers their names too

    HOT = "hot"  # weights in device memory, ready to serve
    PARKED = "parked"  # process and compiled state alive, weights in host RAM
    IMAGE = "image"  # nothing alive (or a standby worker); a ready image on local disk
    ZERO = "zero"  # nothing alive; only the source checkpoint, local or remote

    @property
    def level(self) -> int:
        """0 for HOT up to 3 for ZERO: a larger level is a lower, colder rung."""
        return _LEVEL[self]

    @classmethod
    def parse(cls, name: str) -> Rung:
        """A rung from its name, any case; ``source`` (a climb's word for it) is ZERO. Raises
        ``ValueError`` naming the rungs."""
        key = name.strip().lower()
        try:
            return cls("zero" if key == "source" else key)
        except ValueError:
            raise ValueError(f"unknown rung {name!r}; valid: {', '.join(r.value for r in LADDER)} "
                             "(or 'source' for zero)") from None


LADDER: tuple[Rung, ...] = (Rung.HOT, Rung.PARKED, Rung.IMAGE, Rung.ZERO)  # top to bottom
_LEVEL = {r: i for i, r in enumerate(LADDER)}


class Climb(enum.StrEnum):
    """Where a cold start climbed to HOT from: the rung below it (ZERO reads as where the weights
    came from, ``source``), and whether a standby worker (imports and device init already paid)
    took the load. The value is its one spelling on the wire: the worker's reports,
    ``x-zerostart-cold-start-rung``, ``/zerostart/status`` and the ``rung`` label of the
    cold-start metrics."""

    __hash__ = str.__hash__  # as its value: a dict keyed by climbs answers their labels too

    SOURCE = "source"  # a new worker loaded the source checkpoint (from ZERO)
    IMAGE = "image"  # a new worker restored the ready image
    STANDBY_SOURCE = "standby+source"  # the standby worker loaded the source
    STANDBY_IMAGE = "standby+image"  # the standby worker restored the ready image
    PARKED = "parked"  # a parked worker woke

    @property
    def rung(self) -> Rung:
        """The rung it climbed from."""
        return Rung.parse(self.value.removeprefix("standby+"))

    @property
    def standby(self) -> bool:
        """Whether the standby worker took it."""
        return self.value.startswith("standby+")

    @classmethod
    def of(cls, rung: Rung, *, standby: bool = False) -> Climb:
        """The climb from ``rung`` (IMAGE or ZERO may be a standby worker's; PARKED never is)."""
        return cls(("standby+" if standby else "") + ("source" if rung is Rung.ZERO else rung.value))
