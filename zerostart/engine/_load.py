"""Loading helpers: the device, the dtype, end-of-sequence ids and the KV cache budget."""

from __future__ import annotations

import os

import torch

from zerostart.names import default_dtype, device_type, dtype_name
from zerostart.engine._config import CPU_KV_CACHE_BYTES, EngineConfig, EngineError, ModelConfig, read_json_object
from zerostart.engine._kv_cache import bytes_per_token
from zerostart.engine._tokenizer import Tokenizer

def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg: ModelConfig) -> torch.dtype:
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
    return getattr(torch, default_dtype(device.type, cfg.torch_dtype))


def weights_dtype(model_dir: str, device: str | torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype ``Engine.from_pretrained(model_dir, device=device, dtype=dtype)`` holds the
    weights in (a ready image's fingerprint names it)."""
    cfg = ModelConfig.from_file(os.path.join(model_dir, "config.json"))
    return resolve_dtype(dtype, torch.device(device), cfg)


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


def eos_ids(path: str, cfg: ModelConfig, tokenizer: Tokenizer) -> frozenset[int]:
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


def kv_budget(config: EngineConfig, dev: torch.device, cfg: ModelConfig, dtype: torch.dtype, max_len: int) -> int:
    wanted = bytes_per_token(cfg, dtype) * (max_len + 1) * config.max_num_seqs
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if dev.type == "cpu":
        return min(wanted, CPU_KV_CACHE_BYTES)
    free, total = torch.cuda.mem_get_info(dev)
    # leave room for activations of a prefill chunk and the graphs' pool
    reserve = 64 * 2**20 + config.prefill_chunk * cfg.vocab_size * 4 * 2
    budget = int(config.gpu_memory_utilization * total) - (total - free) - reserve
    return max(0, min(wanted, budget))
