"""``ZerostartModelLoader``: vLLM's ``BaseModelLoader`` over ``zerostart.weights``.

vLLM builds the model (parameters allocated on its device), then calls ``load_weights``; we
load the checkpoint into one host arena in the background and hand vLLM each tensor as soon
as its bytes are in place, so vLLM's per-parameter copies (and casts, and q/k/v packing) run
while the rest of the file is still being read. The arena is dropped when ``load_weights``
returns: mapped page-cache pages are not anonymous memory, and nothing else holds them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from pydantic import ValidationError
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from zerostart import weights
from zerostart.plugins.vllm._options import LOAD_FORMAT, LoaderOptions

log = init_logger("vllm.zerostart")  # under "vllm.", so its lines reach vLLM's log like vLLM's own

# The statistics of this process's latest load (bytes, strategy per file, seconds, verified
# bytes): vLLM keeps no reference to its loader, so tests and benchmarks read them here.
last_stats: weights.LoadStats | None = None


class ZerostartModelLoader(BaseModelLoader):
    """``--load-format zerostart``; options from ``--model-loader-extra-config``."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = load_config.model_loader_extra_config
        if not isinstance(extra, dict):
            raise ValueError(f"--model-loader-extra-config for --load-format {LOAD_FORMAT} must be a JSON object, "
                             f"got {type(extra).__name__}")
        try:
            self.options = LoaderOptions.model_validate(extra)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"--model-loader-extra-config for --load-format {LOAD_FORMAT}: {problems} "
                             f"(known keys: {', '.join(LoaderOptions.model_fields)})") from None
        self.stats: weights.LoadStats | None = None  # the last load's, for tests and logs

    def source(self, model_config: ModelConfig) -> str:
        """Where the weights come from: the ``source`` option, else vLLM's model directory."""
        return self.options.source or model_config.model

    def download_model(self, model_config: ModelConfig) -> None:
        """Remote sources: every file into zerostart's cache (later loads read it from disk)."""
        src = self.source(model_config)
        if weights.is_remote(src):
            weights.pull(src)

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs of the checkpoint, each yielded once its bytes are in place.
        vLLM's in-place reload (``reload_weights``) reads weights through this too."""
        src = self.source(model_config)
        cfg = weights.LoadConfig(threads=self.options.threads, direct_io=self.options.direct_io,
                                 mmap=self.options.mmap, verify=self.options.verify, cache=self.options.cache)
        # Stored dtypes are kept: vLLM's weight loaders cast while they copy into their parameters.
        arena = weights.load_arena(src, "cpu", config=cfg, background=True)
        try:
            # The arena is ordered as the files are (by layer for zerostart's images): waiting for
            # each name in turn overlaps vLLM's copy of tensor i with the read of tensor i+1.
            for name, tensor in arena.tensors.items():
                arena.wait([name])
                yield name, tensor
            arena.wait()  # raises the load's error, if the reads failed after the last tensor
        finally:
            arena.wait_cached()  # a remote source's cache copy is complete before we return
        global last_stats
        self.stats = last_stats = arena.stats
        s = arena.stats
        log.info("zerostart loaded %s: %.3f GB in %.2f s (%.2f GB/s; files by strategy %s; %d bytes verified)",
                 src, s.bytes / 1e9, s.total_s, s.gbps, s.strategy, s.verified_bytes)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        t0 = time.perf_counter()
        # vLLM's model classes define load_weights; nn.Module does not declare it
        loaded = model.load_weights(self.get_all_weights(model_config, model))  # type: ignore[operator]
        _check_all_loaded(model, loaded, model_config)
        log.info("Loading weights took %.2f seconds (zerostart)", time.perf_counter() - t0)


def _check_all_loaded(model: nn.Module, loaded: set[str] | None, model_config: ModelConfig) -> None:
    """Every parameter got its bytes (vLLM's default loader checks the same for unquantized
    models); a checkpoint that misses tensors is an error, not random weights."""
    if loaded is None or model_config.quantization is not None:
        return
    missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{model_config.model}: the checkpoint has no weights for {', '.join(missing[:5])}{more}")
