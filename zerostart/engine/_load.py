"""Loading helpers: the model's files, the device, the dtype, end-of-sequence ids, the KV
cache budget and the warm-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from zerostart import weights
from zerostart.engine._config import CPU_KV_CACHE_BYTES, EngineConfig, ModelShape, read_json_object
from zerostart.engine._errors import EngineError
from zerostart.engine._kv_cache import slot_bytes
from zerostart.engine._model import Transformer
from zerostart.engine._params import SamplingParams
from zerostart.engine._runner import ModelRunner
from zerostart.engine._sequence import RequestHandle
from zerostart.engine._tokenizer import Tokenizer
from zerostart.names import KvDtype, default_dtype, device_type, dtype_name, is_local
from zerostart.telemetry import Timeline


class _Warming(Protocol):
    """What the warm-up drives of an ``Engine`` (``_engine.py`` imports this module: it is named by shape)."""

    device: torch.device
    max_model_len: int
    arena: weights.Arena
    model: Transformer
    runner: ModelRunner

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle: ...

    def step(self) -> bool: ...

_NOT_A_MODEL = "not a model directory (expected config.json, *.safetensors, tokenizer.json) or GGUF file"


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are: its configuration, and whether it is a ready image."""

    source: str  # as the caller named it
    dir: str  # a local directory with config.json and the tokenizer files
    config: ModelShape
    image: dict[str, Any] | None  # the ready image's manifest, if the directory is one
    name: str  # the model's name (its directory's or file's, or the image's source's)

    @property
    def weights(self) -> str:
        """What the weights are loaded from: the image, or the source itself."""
        return self.dir if self.image is not None else self.source


def model_files(source: str) -> ModelFiles:
    """Find the model's files (fetching a remote source's small files into the cache)."""
    if is_local(source) and not os.path.isdir(source) and not weights.is_gguf(source):
        raise EngineError(f"{source}: {_NOT_A_MODEL}")
    try:
        local = weights.localize(source)
    except weights.WeightsError as e:
        raise EngineError(str(e)) from None
    if not os.path.isdir(local):
        raise EngineError(f"{source}: {_NOT_A_MODEL}")
    try:  # an image's files are verified against its manifest before any of them is read
        image = weights.read_manifest(local) if weights.is_image(local) else None
    except weights.ImageError as e:
        raise EngineError(str(e)) from None
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise EngineError(f"{source}: no config.json here (a Hugging Face model directory needs one)")
    cfg = ModelShape.from_file(os.path.join(local, "config.json"))
    named = image["source"] if image and image.get("source") else source
    name = os.path.basename(os.path.normpath(named).rstrip("/")).removesuffix(".gguf")
    return ModelFiles(source, local, cfg, image, name)


def model_dtype(dtype: str | torch.dtype | None, dev: torch.device, files: ModelFiles, quantize: str = "auto") -> torch.dtype:
    """The dtype the weights are held in (an image brings its own, and its quantization unless
    ``quantize`` asks for one; they must match the runtime)."""
    if files.image is not None and dtype is None:
        dtype = files.image["fingerprint"]["dtype"]
    resolved = resolve_dtype(dtype, dev, files.config, files.image is None and held_quantized(files.source, quantize))
    if files.image is not None:
        held = files.image["fingerprint"].get("quantize", "auto")
        try:
            weights.check_compatible(files.dir, weights.fingerprint(files.dir, dev.type, str(resolved),
                                                                    held if quantize == "auto" else quantize))
        except weights.ImageError as e:
            raise EngineError(str(e)) from None
    return resolved


def held_quantized(source: str, quantize: str) -> bool:
    """Whether a model loaded from ``source`` with ``quantize`` holds quantized matrices (an
    image says so itself)."""
    if quantize in ("int8", "int4"):
        return True
    if quantize != "auto":
        return False
    path = weights.gguf_file(source) if is_local(source) else None
    return path is not None and any(t.qtype in weights.GGUF_QUANTIZED for t in weights.open_gguf(path).tensors)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg: ModelShape,
                  quantized: bool = False) -> torch.dtype:
    """``dtype``, or the default: the device's (``default_dtype``), except that on CPU a model
    held quantized computes in float32 (its weights are integers either way, and float32
    activations skip a conversion around every matmul: bench/quant_llamacpp.py)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise EngineError(f"dtype {dtype} is not a floating dtype")
        return dtype
    if isinstance(dtype, str):
        try:
            return getattr(torch, dtype_name(dtype))
        except ValueError as e:
            raise EngineError(str(e)) from None
    if dtype is not None:
        raise EngineError(f"dtype must be a torch.dtype, a name or None (got {dtype!r})")
    if quantized and device.type == "cpu":
        return torch.float32
    return getattr(torch, default_dtype(device.type, cfg.torch_dtype))


def weights_dtype(model_dir: str, device: str | torch.device, dtype: str | torch.dtype | None = None,
                  quantize: str = "auto", source: str | None = None) -> torch.dtype:
    """The dtype ``Engine.from_pretrained(source or model_dir, device=device, dtype=dtype)``
    with ``quantize`` holds the weights in (a ready image's fingerprint names it)."""
    cfg = ModelShape.from_file(os.path.join(model_dir, "config.json"))
    return resolve_dtype(dtype, torch.device(device), cfg, held_quantized(source or model_dir, quantize))


def device_for(device: str | torch.device) -> torch.device:
    if not isinstance(device, torch.device):
        try:
            device_type(device)  # the names every package accepts (zerostart.names)
        except ValueError as e:
            raise EngineError(str(e)) from None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EngineError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError("device 'cuda' was requested but no CUDA device is available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.init()
        torch.empty(1, device=dev)  # creates the context
    elif dev.type != "cpu":
        raise EngineError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def set_threads(config: EngineConfig, dev: torch.device) -> None:
    """Apply ``config.threads`` (CPU compute threads) to this process."""
    if config.threads is not None and dev.type == "cpu" and torch.get_num_threads() != config.threads:
        torch.set_num_threads(config.threads)


def eos_ids(path: str, cfg: ModelShape, tokenizer: Tokenizer) -> frozenset[int]:
    """End-of-sequence ids: generation_config.json, else config.json, plus the tokenizer's eos token."""
    ids: set[int] = set()
    gen = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen):
        eos = read_json_object(gen).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(i for i in eos if isinstance(i, int))
    if not ids:
        ids.update(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def kv_dtype(model: Transformer, dtype: torch.dtype, dev: torch.device, wanted: KvDtype = "auto") -> torch.dtype:
    """The KV cache's dtype: ``wanted`` (``EngineConfig.kv_dtype``), or for "auto" the
    activations' (``dtype``), except on the CPU for float32 activations over quantized matrices,
    whose cache is bfloat16: half the bytes to hold and to read each decode step, as llama.cpp
    keeps an f16 cache (attention still computes in float32)."""
    if wanted != "auto":
        if dev.type == "cpu" and wanted == "float16":
            raise EngineError("kv_dtype float16 is for CUDA; on the CPU the cache is float32 or bfloat16")
        return getattr(torch, wanted)
    if dev.type == "cpu" and dtype == torch.float32 and model.quantized():
        return torch.bfloat16
    return dtype


def kv_budget(config: EngineConfig, dev: torch.device, cfg: ModelShape, dtype: torch.dtype, max_len: int) -> int:
    wanted = slot_bytes(cfg, dtype, max_len, dev) * config.max_num_seqs
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if dev.type == "cpu":
        return min(wanted, CPU_KV_CACHE_BYTES)
    free, total = torch.cuda.mem_get_info(dev)
    # leave room for activations of a prefill chunk and the graphs' pool
    reserve = 64 * 2**20 + (config.prefill_chunk or 0) * cfg.vocab_size * 4 * 2
    budget = int(config.gpu_memory_utilization * total) - (total - free) - reserve
    return max(0, min(wanted, budget))


def timeline_for(timeline: Timeline | None, source: str, import_start: float, import_end: float) -> Timeline:
    """The load's timeline (by default measured from the start of the engine's import), with
    the import in it when it belongs to this load."""
    if timeline is None:
        timeline = Timeline(origin=import_start, label=f"engine {os.path.basename(source.rstrip('/'))}")
    if import_end >= timeline.origin:
        timeline.add("import", max(import_start, timeline.origin), import_end)
    return timeline


def record_load(timeline: Timeline, stats, t_load: float) -> None:
    """The load's own read and copy phases (they may overlap prepare and warm-up)."""
    if stats.read_until > stats.read_from > 0:
        timeline.add("read", stats.read_from, stats.read_until, bytes=stats.bytes, strategy=dict(stats.strategy),
                     setup_s=round(stats.setup_s, 4), verified_bytes=stats.verified_bytes, verify_s=round(stats.verify_s, 4),
                     prefaulted_bytes=stats.prefaulted_bytes)
    elif stats.total_s:
        timeline.add("read", t_load, t_load + stats.total_s, bytes=stats.bytes, strategy=dict(stats.strategy),
                     prefaulted_bytes=stats.prefaulted_bytes)
    if stats.copy_until > stats.copy_from > 0:
        timeline.add("copy", stats.copy_from, stats.copy_until, bytes=stats.bytes)


def warm_up(engine: _Warming) -> int | None:
    """The load's last phase: one request through every stage, then the decode graphs. Returns
    the compute threads it used while weights were still arriving (None: all)."""
    # One real request through every stage (prefill, sampling, detokenization; on CUDA a
    # decode step too) so the first user request does not pay for first-call costs; then
    # the decode graphs. While the weights are still loading, its forward passes wait
    # stage by stage. A CPU has no kernels to compile and no graphs to capture, and a
    # forward pass costs as much the first time as later, so there one prompt token is
    # enough; the readers also need a core there for their system calls and checksum
    # hashing, so while bytes are still arriving the warm-up computes on one thread fewer.
    cpu = engine.device.type == "cpu"
    n = 1 if cpu else min(8, engine.max_model_len - 2)
    threads = torch.get_num_threads()
    sharing = cpu and threads > 1 and not engine.arena.done and engine.model.wait_stage is not None
    shared = threads - 1 if sharing else None
    if sharing:
        wait = engine.model.wait_stage
        assert wait is not None  # sharing implies it

        def wait_then_restore(i: int) -> None:  # runs on the compute thread, between layers
            nonlocal sharing
            wait(i)
            if sharing and engine.arena.done:
                torch.set_num_threads(threads)
                sharing = False

        engine.model.wait_stage = wait_then_restore
        torch.set_num_threads(threads - 1)
    try:
        handle = engine.submit([0] * max(1, n), SamplingParams(max_tokens=1 if cpu else 2, temperature=0, ignore_eos=True))
        while not handle.finished:
            engine.step()
        for _ in handle:
            pass
    finally:
        if sharing:
            torch.set_num_threads(threads)
    engine.arena.wait()  # every byte in place before graphs capture the weights' addresses
    engine.model.wait_stage = None
    engine.runner.capture_all(max_len=engine.runner.len_buckets[0])
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return shared
